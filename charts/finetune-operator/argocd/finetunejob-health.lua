-- Argo CD health check for finetune.dev/FineTuneJob (Lua 5.1, as Argo CD runs it).
-- Maps the operator's status.phase and conditions onto Argo CD health:
--   Succeeded -> Healthy; Failed -> Degraded (the Failed condition's message);
--   Suspended (spec.suspend in effect) -> Suspended; Pending/Planning/Queued/Running -> Progressing.
-- A status not yet computed for the current spec (observedGeneration behind) is
-- Progressing, so a sync is not reported healthy on a stale status.
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
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to plan the job"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil
    and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "The operator has not yet observed generation " .. tostring(generation)
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = explain(condition(status, "Succeeded"), "Training finished")
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = explain(condition(status, "Failed"), "Training failed")
  return hs
end

local suspended = condition(status, "Suspended")
if suspended ~= nil and suspended.status == "True" then
  hs.status = "Suspended"
  hs.message = explain(suspended, "Suspended by spec.suspend")
  return hs
end

hs.status = "Progressing"
if phase == "Running" then
  local msg = explain(condition(status, "Running"), "Training")
  if status.progress ~= nil and status.progress.percent ~= nil then
    msg = msg .. " (" .. tostring(status.progress.percent) .. "%)"
  end
  hs.message = msg
elseif phase == "Queued" then
  hs.message = explain(condition(status, "Queued"), "Waiting for GPU quota")
elseif phase == "Planning" then
  hs.message = explain(condition(status, "Planned"), "Planning GPU memory")
else
  hs.message = explain(condition(status, "Planned"), "Phase " .. tostring(phase))
end
return hs
