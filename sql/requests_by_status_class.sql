-- Requests per tenant and HTTP status class (1xx to 5xx).
--
-- No dedup here: meterlake dedups at write on request_id (dedup in every query costs ~6x).
-- Unauthenticated traffic (tenant_id NULL) is its own group.
--
-- @param start timestamp  Start of the window, inclusive (default: 1970-01-01T00:00:00Z)
-- @param end timestamp  End of the window, exclusive (default: now)
SELECT
    tenant_id,
    CASE
        WHEN status >= 500 THEN '5xx'
        WHEN status >= 400 THEN '4xx'
        WHEN status >= 300 THEN '3xx'
        WHEN status >= 200 THEN '2xx'
        ELSE '1xx'
    END AS status_class,
    count(*) AS requests
FROM metering_events
WHERE request_time >= from_iso8601_timestamp(:start)
    AND request_time < from_iso8601_timestamp(:end)
GROUP BY 1, 2
ORDER BY tenant_id NULLS LAST, status_class
