-- Argo CD health check for lora-operator.dev/LoRATrainingJob.
-- Install under argocd-cm `resource.customizations.health.lora-operator.dev_LoRATrainingJob`
-- (see docs/argocd.md). Argo CD passes the live object as `obj` and reads `hs`.
--
--   status absent, or observedGeneration < generation  -> Progressing (status not current yet)
--   phase Succeeded                                    -> Healthy
--   phase Failed                                       -> Degraded
--   condition Stalled=True                             -> Degraded
--   phase Suspended                                    -> Suspended
--   phase Pending / Running / Recovering (or unknown)  -> Progressing
-- The message is the deciding condition's message, else status.message, else Ready's message.

local hs = { status = "Progressing", message = "Waiting for the operator to observe the job" }

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function message_of(status, preferred, fallback)
  if preferred ~= nil and preferred.message ~= nil and preferred.message ~= "" then
    return preferred.message
  end
  if status.message ~= nil and status.message ~= "" then
    return status.message
  end
  local ready = condition(status, "Ready")
  if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
    return ready.message
  end
  return fallback
end

local status = obj.status
if status == nil then
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase or ""
local stalled = condition(status, "Stalled")
if stalled ~= nil and stalled.status ~= "True" then
  stalled = nil
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message_of(status, nil, "Training finished")
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message_of(status, stalled, "Training failed")
elseif stalled ~= nil then
  hs.status = "Degraded"
  hs.message = message_of(status, stalled, "Stalled")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message_of(status, nil, "Suspended")
else
  hs.status = "Progressing"
  local reconciling = condition(status, "Reconciling")
  local fallback = phase ~= "" and ("Phase: " .. phase) or "Waiting for the operator"
  if reconciling ~= nil and reconciling.status ~= "True" then
    reconciling = nil
  end
  hs.message = message_of(status, reconciling, fallback)
end
return hs
