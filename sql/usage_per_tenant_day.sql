-- Usage per tenant and UTC day: requests, billable requests, bytes out, 4xx/5xx errors and p95 latency.
--
-- No dedup here: meterlake dedups at write on request_id (dedup in every query costs ~6x).
-- Billable: status < 500 and a tenant (client errors are billed; server errors and unauthenticated traffic are not).
-- Unauthenticated traffic (tenant_id NULL) is its own group.
--
-- @param start timestamp  Start of the window, inclusive (default: 1970-01-01T00:00:00Z)
-- @param end timestamp  End of the window, exclusive (default: now)
-- @param tenant_id string  Only this tenant (optional)
SELECT
    tenant_id,
    CAST(request_time AS date) AS usage_date,
    count(*) AS requests,
    count_if(status < 500 AND tenant_id IS NOT NULL) AS billable_requests,
    coalesce(sum(response_length), 0) AS bytes_out,
    count_if(status >= 400 AND status < 500) AS errors_4xx,
    count_if(status >= 500) AS errors_5xx,
    approx_percentile(response_latency_ms, 0.95) AS p95_latency_ms
FROM metering_events
WHERE request_time >= from_iso8601_timestamp(:start)
    AND request_time < from_iso8601_timestamp(:end)
    AND (:tenant_id IS NULL OR tenant_id = :tenant_id)
GROUP BY tenant_id, CAST(request_time AS date)
ORDER BY usage_date, tenant_id NULLS LAST
