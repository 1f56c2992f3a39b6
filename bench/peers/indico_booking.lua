-- wrk script for Indico's room booking, the twin of bench/booking.lua: request k books room (k mod n) at hour
-- floor(k / n) after the first epoch (skipping 23:00, see below), so no two requests conflict and the grid is
-- LabCommons' one as far as Indico gets.
-- Arguments after `--`: a file with one room id per line, a file with "user_id token" per line, the first epoch
-- second (UTC midnight; Indico runs with DEFAULT_TIMEZONE UTC and takes naive times), and the number of threads.
-- Indico answers 200 to a booking and 418 to a conflict.
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
  rooms = lines(args[1])
  users, tokens = {}, {}
  for _, line in ipairs(lines(args[2])) do
    local user, token = line:match("^(%S+)%s+(%S+)$")
    table.insert(users, user)
    table.insert(tokens, token)
  end
  base = tonumber(args[3])
  nthreads = tonumber(args[4])
  counter = 0
  ok, conflict, other = 0, 0, 0
end

function request()
  local k = counter * nthreads + tid
  counter = counter + 1
  local n = #rooms
  local room = rooms[(k % n) + 1]
  -- Hour h of the grid; Indico refuses (500) a non-repeating booking that ends on another day, so the 23:00
  -- slot is skipped: hours 0-22 of each day. Only a run of more than 23 x rooms bookings reaches it.
  local h = math.floor(k / n)
  local starts = base + math.floor(h / 23) * 86400 + (h % 23) * 3600
  local who = (k % #tokens) + 1
  local body = string.format(
    '{"start_dt": "%s", "end_dt": "%s", "repeat_frequency": "NEVER", "repeat_interval": 0, "room_id": %s, ' ..
    '"reason": "bench", "user": "User:%s"}',
    os.date("!%Y-%m-%dT%H:%M:%S", starts), os.date("!%Y-%m-%dT%H:%M:%S", starts + 3600), room, users[who])
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. tokens[who],
  }
  return wrk.format("POST", "/rooms/api/booking/create", headers, body)
end

function response(status, headers, body)
  if status == 200 then ok = ok + 1
  elseif status == 418 then conflict = conflict + 1
  else
    other = other + 1
    if other <= 3 then io.stderr:write(status .. " " .. string.sub(body, 1, 300) .. "\n") end
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
