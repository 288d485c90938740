-- Each tenant's top routes (resource path and HTTP method) by requests, with bytes out and p95 latency.
--
-- No dedup here: meterlake dedups at write on request_id (dedup in every query costs ~6x).
-- Ties rank by path, then method, so the result is stable. Unauthenticated traffic (tenant_id NULL) is its own group.
--
-- @param start timestamp  Start of the window, inclusive (default: 1970-01-01T00:00:00Z)
-- @param end timestamp  End of the window, exclusive (default: now)
-- @param limit integer  Routes kept per tenant (min: 1) (default: 10)
WITH route_usage AS (
    SELECT
        tenant_id,
        resource_path,
        http_method,
        count(*) AS requests,
        coalesce(sum(response_length), 0) AS bytes_out,
        approx_percentile(response_latency_ms, 0.95) AS p95_latency_ms
    FROM metering_events
    WHERE request_time >= from_iso8601_timestamp(:start)
        AND request_time < from_iso8601_timestamp(:end)
    GROUP BY tenant_id, resource_path, http_method
),
ranked AS (
    SELECT
        route_usage.*,
        row_number() OVER (
            PARTITION BY tenant_id
            ORDER BY requests DESC, resource_path NULLS LAST, http_method
        ) AS route_rank
    FROM route_usage
)
SELECT tenant_id, route_rank, resource_path, http_method, requests, bytes_out, p95_latency_ms
FROM ranked
WHERE route_rank <= :limit
ORDER BY tenant_id NULLS LAST, route_rank
