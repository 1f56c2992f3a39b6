-- wrk script: every request books a different (instrument, hour), so no two requests conflict.
-- Arguments after `--`: path of a file with one "instrument_id" per line, tokens file, first epoch second,
-- and the number of threads. Request k of thread t is global request k*threads+t.
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local function lines(path)
  local out = {}
  for line in io.lines(path) do
    if line ~= "" then table.insert(out, line) end
  end
  return out
end

function init(args)
  instruments = lines(args[1])
  tokens = lines(args[2])
  base = tonumber(args[3])
  nthreads = tonumber(args[4])
  counter = 0
  ok, conflict, other = 0, 0, 0
end

function request()
  local k = counter * nthreads + tid
  counter = counter + 1
  local n = #instruments
  local instrument = instruments[(k % n) + 1]
  local starts = base + math.floor(k / n) * 3600
  local body = string.format(
    '{"instrument_id": %s, "starts_at": "%s", "ends_at": "%s", "purpose": "bench"}',
    instrument, os.date("!%Y-%m-%dT%H:%M:%SZ", starts), os.date("!%Y-%m-%dT%H:%M:%SZ", starts + 3600))
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. tokens[(k % #tokens) + 1],
  }
  return wrk.format("POST", "/api/v1/bookings", headers, body)
end

function response(status, headers, body)
  if status == 201 then ok = ok + 1
  elseif status == 409 then conflict = conflict + 1
  else
    other = other + 1
    if other <= 3 then io.stderr:write(status .. " " .. body .. "\n") end
  end
end

function done(summary, latency, requests)
  local ok_total, conflict_total, other_total = 0, 0, 0
  for _, thread in ipairs(threads) do
    ok_total = ok_total + thread:get("ok")
    conflict_total = conflict_total + thread:get("conflict")
    other_total = other_total + thread:get("other")
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "ok": %d, "conflict": %d, "other": %d, ' ..
    '"socket_errors": %d, "p50_us": %d, "p90_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"mean_us": %.1f}\n',
    summary.requests, summary.duration, ok_total, conflict_total, other_total,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99),
    latency.max, latency.mean))
end
