-- wrk script for scripts/bench: every request carries the next session cookie from a file, so
-- the requests cycle through all the sessions (each wrk thread starts at its own offset).
--   wrk ... -s scripts/lib/cycle-cookies.lua URL -- COOKIE-FILE COOKIE-NAME [HEADER: VALUE]...
-- Every request is formatted once, when the thread starts: `request()` only hands out the next
-- one. Formatting per request (`wrk.format` builds the text in Lua each time) cost wrk ~2.6 µs
-- of CPU per request on the 2-core machine, CPU that the proxy under test then lacked.
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

local requests, i

function init(args)
  local cookies = {}
  for line in io.lines(args[1]) do
    if #line > 0 then cookies[#cookies + 1] = line end
  end
  if #cookies == 0 then error("no cookies in " .. args[1]) end
  local headers = {}
  for k = 3, #args do
    local h, v = args[k]:match("^([^:]+):%s*(.*)$")
    if h then headers[h] = v end
  end
  requests = {}
  for k = 1, #cookies do
    headers["Cookie"] = args[2] .. "=" .. cookies[k]
    requests[k] = wrk.format(nil, nil, headers)
  end
  -- Spread the threads over the list.
  i = math.floor((id or 0) * 0.618 * #requests) % #requests
end

function request()
  i = i % #requests + 1
  return requests[i]
end
