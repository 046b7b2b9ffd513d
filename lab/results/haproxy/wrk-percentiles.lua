-- tproxy bench: the percentiles wrk's --latency leaves out, in µs.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "tproxy-bench: requests=%d duration_us=%d p50=%d p90=%d p99=%d p99.9=%d max=%d mean=%.2f errors=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean,
    e.connect + e.read + e.write + e.status + e.timeout))
end
