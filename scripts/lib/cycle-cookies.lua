-- wrk script for scripts/bench: every request carries the next session cookie from a file, so
-- the requests cycle through all the sessions (each wrk thread starts at its own offset).
--   wrk ... -s scripts/lib/cycle-cookies.lua URL -- COOKIE-FILE COOKIE-NAME [HEADER: VALUE]...
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

local cookies, name, i
local headers = {}

function init(args)
  cookies = {}
  for line in io.lines(args[1]) do
    if #line > 0 then cookies[#cookies + 1] = line end
  end
  if #cookies == 0 then error("no cookies in " .. args[1]) end
  name = args[2]
  for k = 3, #args do
    local h, v = args[k]:match("^([^:]+):%s*(.*)$")
    if h then headers[h] = v end
  end
  -- Spread the threads over the list.
  i = math.floor((id or 0) * 0.618 * #cookies) % #cookies
end

function request()
  i = i % #cookies + 1
  headers["Cookie"] = name .. "=" .. cookies[i]
  return wrk.format(nil, nil, headers)
end
