-- wrk script for scenario 5 of scripts/bench: every request POSTs a 1 MiB body.
-- wrk adds the Content-Length header itself because wrk.body is set.
wrk.method = "POST"
wrk.body = string.rep("x", 1024 * 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
