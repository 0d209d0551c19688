-- Prelude of the transitions: the key names and limits they share. A name in dollar-braces is
-- a Python constant (deepe_tasks/core/keys.py, deepe_tasks/core/lua/__init__.py), written in
-- once when the scripts are loaded. These keys are not in KEYS: every transition may write the
-- shared indexes and counters, and the names of some keys are only known here (docs/architecture.md).
local INDEX, EXPIRING, STATS = '${JOBS_INDEX}', '${EXPIRING}', '${STATS}'
local QUEUES, METHOD_USERS, IDS = '${QUEUES}', '${METHOD_USERS}', '${IDS}'
local BY_STATUS, BY_METHOD, JOB, SOURCE = '${BY_STATUS}', '${BY_METHOD}', '${JOB}', '${SOURCE}'
local WEBHOOKS_ON, OUTBOX = '${WEBHOOKS_ON}', '${WEBHOOK_OUTBOX}'
local ENDED_MAXLEN = ${ENDED_STREAM_MAXLEN}
local BUCKETS = {${DURATION_BUCKETS}}
local FINAL = {'succeeded', 'failed', 'cancelled'}
