-- Every query the services send, by name. services/common/queries.py loads this file; a name is
-- introduced by a line "-- name: <name>" and the query runs to the next such line.

-- name: append_events
-- Append to one or many jobs in one transaction; see append_events() in the migrations.
SELECT append_no, result, current_seq, first_position, last_position
  FROM append_events($1::uuid[], $2::integer[], $3::integer[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::uuid[], $9::text[], $10::text[], $11::text[],
                     $12::timestamptz[], $13::boolean);

-- name: job_head
-- The projection row of one job: where its stream ends and its folded state there.
SELECT job_id, project_id, owner_id, status, last_seq, last_position, state
  FROM jobs
 WHERE job_id = $1;

-- name: read_stream
-- One job's events after a seq, in seq order.
SELECT position, job_id, project_id, seq, event_id, type, occurred_at, actor, data
  FROM events
 WHERE job_id = $1 AND seq > $2
 ORDER BY seq
 LIMIT $3;

-- name: tail
-- The log after a position, in position order. Positions are handed out in commit order (see
-- events_serialize_appends), so nothing can later appear below what this returns.
SELECT position, job_id, project_id, seq, event_id, type, occurred_at, actor, data
  FROM events
 WHERE position > $1
 ORDER BY position
 LIMIT $2;

-- name: head_position
-- The highest committed position: every event at or below it is visible.
SELECT coalesce(max(position), 0) FROM events;

-- name: chain_links
-- What the hash chain of one job covers, in seq order.
SELECT job_id, seq, event_id, type, actor, project_id, owner_id, occurred_at, data,
       prev_hash, hash
  FROM events
 WHERE job_id = $1
 ORDER BY seq;

-- name: job_ids_page
-- Job ids that have events, in id order, for rebuilding the projection page by page.
SELECT DISTINCT job_id
  FROM events
 WHERE job_id > $1
 ORDER BY job_id
 LIMIT $2;

-- name: upsert_projection
-- Write one job's projection row as rebuilt from its events.
INSERT INTO jobs (job_id, project_id, owner_id, status, last_seq, last_position, state,
                  created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7::json, $8, now())
ON CONFLICT (job_id) DO UPDATE
   SET project_id = excluded.project_id, owner_id = excluded.owner_id,
       status = excluded.status, last_seq = excluded.last_seq,
       last_position = excluded.last_position, state = excluded.state,
       updated_at = now();

-- name: job_owner
-- The owner recorded on a job's first event.
SELECT owner_id, recorded_at FROM events WHERE job_id = $1 AND seq = 1;

-- name: lock_job
-- Hold a job's projection row, as appends do, while the projection is rebuilt.
SELECT 1 FROM jobs WHERE job_id = $1 FOR UPDATE;
