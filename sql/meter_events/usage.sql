-- Usage of one event meter per customer and UTC interval: every aggregate a usage query of meter_events answers.
--
-- The table is meter_events (events ingested through the metering service), not the access-log table.
-- Buckets start at UTC hour, day, week (Monday) or month boundaries; events count by their own time.
-- No dedup here: the delivery stream drops an event whose (meter_api_name, unique_id) it committed before.
-- Cancellation rules live in the service's registry, so this counts events before them; the service's usage
-- queries exclude the events a rule matches (with no rule, the two agree on every bucket).
-- unique_count counts the distinct values of the dimension :unique_dimension (a meter's first dimension).
--
-- @param meter_api_name string  The event meter
-- @param start timestamp  Start of the window, inclusive
-- @param end timestamp  End of the window, exclusive (default: now)
-- @param unit string  The interval: hour, day, week or month (default: day)
-- @param unique_dimension string  The dimension unique_count counts distinct values of (optional)
SELECT
    customer_id,
    to_unixtime(date_trunc(:unit, meter_time)) AS bucket_epoch_s,
    sum(meter_value) AS sum_value,
    count(*) AS event_count,
    min(meter_value) AS min_value,
    max(meter_value) AS max_value,
    count(DISTINCT element_at(dimensions, :unique_dimension)) AS unique_count
FROM meter_events
WHERE meter_api_name = :meter_api_name
    AND meter_time >= from_iso8601_timestamp(:start)
    AND meter_time < from_iso8601_timestamp(:end)
GROUP BY customer_id, date_trunc(:unit, meter_time)
ORDER BY bucket_epoch_s, customer_id
