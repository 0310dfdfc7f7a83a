-- Argo CD health check for finetune.dev/AdapterDeployment (Lua 5.1, as Argo CD runs it).
-- Degraded=True -> Degraded (its message); Available=True or Ready=True -> Healthy;
-- anything else -> Progressing (the Progressing condition's message, if any). A status
-- computed for an older spec (observedGeneration behind) is Progressing.
local hs = {}

local function condition(status, type)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local function explain(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason .. ": " .. c.message
    end
    return c.message
  end
  return fallback
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to start the adapter server"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil
    and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "The operator has not yet observed generation " .. tostring(generation)
  return hs
end

local degraded = condition(status, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = explain(degraded, "The adapter server is degraded")
  return hs
end

for _, type in ipairs({"Available", "Ready"}) do
  local c = condition(status, type)
  if c ~= nil and c.status == "True" then
    hs.status = "Healthy"
    hs.message = explain(c, "The adapter is being served")
    return hs
  end
end

hs.status = "Progressing"
hs.message = explain(condition(status, "Progressing"), "Waiting for the adapter server")
return hs
