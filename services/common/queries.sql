-- Every query the services send, by name. services/common/queries.py loads this file; a name is
-- introduced by a line "-- name: <name>" and the query runs to the next such line.

-- name: append_events
-- Append to one or many jobs in one transaction; see append_events() in the migrations.
SELECT append_no, result, current_seq, first_position, last_position
  FROM append_events($1::uuid[], $2::integer[], $3::integer[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::integer[], $9::uuid[], $10::text[], $11::text[],
                     $12::text[], $13::timestamptz[], $14::integer[], $15::bytea[], $16::bytea[],
                     $17::boolean);

-- name: append_events_packed
-- The same, with the texts, the event times (epoch microseconds) and the hashes (bytea hex text,
-- '' for none) each packed as one text of its elements; see migration 0013.
SELECT append_no, result, current_seq, first_position, last_position
  FROM append_events($1::uuid[], $2::integer[], $3::integer[], unpack_fields($4),
                     unpack_fields($5), unpack_fields($6), unpack_fields($7), $8::integer[],
                     $9::uuid[], unpack_fields($10), unpack_fields($11), unpack_fields($12),
                     unpack_micros($13), $14::integer[], unpack_fields($15, '')::bytea[],
                     unpack_fields($16, '')::bytea[], $17::boolean);

-- name: append_head
-- What a writer needs to append to a job: where its stream ends, its folded state there, its
-- owner, and the hash of its last event (by the (job_id, seq) key: one index probe).
SELECT j.last_seq, j.owner_id, j.state, e.hash
  FROM jobs j
  LEFT JOIN events e ON e.job_id = j.job_id AND e.seq = j.last_seq
 WHERE j.job_id = $1;

-- name: job_head
-- The projection row of one job: where its stream ends and its folded state there.
SELECT job_id, project_id, owner_id, status, last_seq, state
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
-- What the hash chain of one job covers, in seq order (and where each event sits in the log).
SELECT job_id, seq, event_id, type, actor, project_id, owner_id, occurred_at, data,
       prev_hash, hash, position
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
INSERT INTO jobs (job_id, project_id, owner_id, status, last_seq, state, created_at,
                  updated_at, archive_expired)
VALUES ($1, $2, $3, $4, $5, $6::json, $7, now(),
        coalesce(($6::json ->> 'archiveExpired') = 'true', false))
ON CONFLICT (job_id) DO UPDATE
   SET project_id = excluded.project_id, owner_id = excluded.owner_id,
       status = excluded.status, last_seq = excluded.last_seq, state = excluded.state,
       archive_expired = excluded.archive_expired, updated_at = now();

-- name: job_owner
-- The owner recorded on a job's first event.
SELECT owner_id, recorded_at FROM events WHERE job_id = $1 AND seq = 1;

-- name: lock_job
-- Hold a job's projection row, as appends do, while the projection is rebuilt.
SELECT 1 FROM jobs WHERE job_id = $1 FOR UPDATE;

-- name: claim_jobs
-- Take up to $2 claimable jobs for worker $1 under a lease of $3 seconds: unfinished jobs that
-- nobody holds, either never claimed or whose lease ran out (their worker died), and that are
-- not among $5, the jobs the claiming process still runs. A user holds at
-- most $4 leases: jobs already leased count, and so do the ones this claim takes, ranked by
-- age per user. Callers run this under the claim lock (see Worker._claim), so that two
-- processes claiming at the same moment see each other's claims.
WITH busy AS (
    SELECT owner_id, count(*) AS n
      FROM jobs
     WHERE status IN ('queued', 'running', 'cancelling')
       AND lease_owner IS NOT NULL AND lease_expires_at >= now()
     GROUP BY owner_id
), candidate AS (
    SELECT j.job_id, j.owner_id, j.created_at, j.lease_owner AS previous_owner
      FROM jobs j
     WHERE j.status IN ('queued', 'running', 'cancelling')
       AND (j.lease_expires_at IS NULL OR j.lease_expires_at < now())
       AND NOT (j.job_id = ANY ($5::uuid[]))
       AND coalesce((SELECT b.n FROM busy b WHERE b.owner_id = j.owner_id), 0) < $4
     ORDER BY j.created_at, j.job_id
     LIMIT $2 * greatest($4, 1)
       FOR UPDATE OF j SKIP LOCKED
), chosen AS (
    SELECT c.job_id, c.previous_owner
      FROM (SELECT c.*, row_number() OVER (PARTITION BY c.owner_id
                                           ORDER BY c.created_at, c.job_id) AS k
              FROM candidate c) c
     WHERE coalesce((SELECT b.n FROM busy b WHERE b.owner_id = c.owner_id), 0) + c.k <= $4
     ORDER BY c.created_at, c.job_id
     LIMIT $2
)
UPDATE jobs
   SET lease_owner = $1,
       lease_expires_at = now() + make_interval(secs => $3),
       attempts = jobs.attempts + 1
  FROM chosen candidate
 WHERE jobs.job_id = candidate.job_id
RETURNING jobs.job_id, jobs.project_id, jobs.owner_id, jobs.status, jobs.last_seq, jobs.state,
          jobs.attempts, candidate.previous_owner;

-- name: renew_leases
-- Extend worker $1's leases on jobs $2 by $3 seconds; answer each job still held with its
-- status, so a cancel requested elsewhere is noticed here too. The rows are locked in job id
-- order first, the order every statement that locks several job rows keeps (append_events,
-- group commit): a plain multi-row UPDATE locks in whatever order its plan reads them, and
-- deadlocks against a batch of appends holding some of the same rows.
WITH held AS (
    SELECT job_id
      FROM jobs
     WHERE job_id = ANY ($2::uuid[]) AND lease_owner = $1
     ORDER BY job_id
       FOR UPDATE
)
UPDATE jobs
   SET lease_expires_at = now() + make_interval(secs => $3)
  FROM held
 WHERE jobs.job_id = held.job_id AND jobs.lease_owner = $1
RETURNING jobs.job_id, jobs.status;

-- name: release_lease
-- The job is finished (or given back): let go of it.
UPDATE jobs
   SET lease_owner = NULL, lease_expires_at = NULL
 WHERE job_id = $1 AND lease_owner = $2;

-- name: cancelling_among
-- Which of these jobs have a cancel requested.
SELECT job_id FROM jobs WHERE job_id = ANY ($1::uuid[]) AND status = 'cancelling';

-- name: queue_position
-- How many queued jobs are ahead of this one (0: it is next).
SELECT count(*)
  FROM jobs q, jobs j
 WHERE j.job_id = $1 AND q.status = 'queued'
   AND (q.created_at, q.job_id) < (j.created_at, j.job_id);

-- name: remember_idempotency_key
-- Record which job a client's Idempotency-Key created; nothing when the key is known already.
INSERT INTO idempotency_keys (owner_id, project_id, key, request_hash, job_id)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING
RETURNING job_id;

-- name: idempotency_key
-- The job an Idempotency-Key created before, and the request it came with.
SELECT job_id, request_hash
  FROM idempotency_keys
 WHERE owner_id = $1 AND project_id = $2 AND key = $3;

-- name: project_jobs_page
-- A project's jobs, newest first, after a (created_at, job_id) cursor.
SELECT job_id, status, last_seq, state, created_at
  FROM jobs
 WHERE project_id = $1 AND status <> 'new'
   AND ($2::timestamptz IS NULL OR (created_at, job_id) < ($2, $3::uuid))
 ORDER BY created_at DESC, job_id DESC
 LIMIT $4;

-- name: job_ownership
-- A job's project and owner, for access checks.
SELECT project_id, owner_id, status, last_seq FROM jobs WHERE job_id = $1 AND status <> 'new';

-- name: hand_back
-- A worker shutting down gives its job back for another to resume at once; a graceful
-- hand-back is not a failed attempt.
UPDATE jobs
   SET lease_expires_at = now(), attempts = greatest(attempts - 1, 0)
 WHERE job_id = $1 AND lease_owner = $2;

-- name: lease_fence
-- Inside a worker's append transaction: hold the job's row and make sure this worker still owns
-- its lease (extending it), so that a worker that lost the job can never write to it again.
UPDATE jobs
   SET lease_expires_at = greatest(lease_expires_at, now() + make_interval(secs => $3))
 WHERE job_id = $1 AND lease_owner = $2
RETURNING 1;

-- name: job_lease
-- Who holds a job, and its state.
SELECT lease_owner, state FROM jobs WHERE job_id = $1;

-- name: expirable_archives
-- Completed jobs that completed more than $1 seconds ago and whose archive has not expired,
-- oldest first, at most $2, locked until the caller's transaction ends. Rows another sweeper
-- holds are skipped, so concurrent sweepers share the work. Served by jobs_archive_live (0006).
SELECT job_id, last_seq
  FROM jobs
 WHERE status = 'completed' AND NOT archive_expired
   AND created_at < now() - make_interval(secs => $1)
   AND (state ->> 'finishedAt')::timestamptz < now() - make_interval(secs => $1)
 ORDER BY created_at, job_id
 LIMIT $2
   FOR UPDATE SKIP LOCKED;

-- name: expired_among
-- Which of these jobs the log shows with an expired archive (their files may be deleted).
SELECT job_id
  FROM jobs
 WHERE job_id = ANY ($1::uuid[]) AND status = 'completed' AND archive_expired;

-- name: job_states
-- The projected state of many jobs at once (the gateway's coalesced snapshot reads).
SELECT job_id, state FROM jobs WHERE job_id = ANY($1::uuid[]) AND status <> 'new';

-- name: job_ranges
-- Events of many jobs in one query, one seq range (after_seq, upto] per row of the arrays.
SELECT r.n, e.position, e.job_id, e.project_id, e.seq, e.event_id, e.type, e.occurred_at,
       e.actor, e.data
  FROM unnest($1::uuid[], $2::integer[], $3::integer[]) WITH ORDINALITY AS r(job_id, after_seq, upto, n)
 CROSS JOIN LATERAL (
       SELECT * FROM events
        WHERE events.job_id = r.job_id AND events.seq > r.after_seq AND events.seq <= r.upto
        ORDER BY events.seq) AS e
 ORDER BY r.n, e.seq;

-- name: project_snapshots
-- For each project: the log's head and the state of its newest jobs, read in one statement so
-- that the states are exactly those of the events up to the head (positions are handed out in
-- commit order, so a snapshot sees every position up to the highest one it sees).
SELECT p.project_id,
       (SELECT coalesce(max(position), 0) FROM events) AS head,
       (SELECT coalesce(json_agg(j.state ORDER BY j.created_at DESC, j.job_id DESC), '[]')
          FROM (SELECT state, created_at, job_id FROM jobs
                 WHERE jobs.project_id = p.project_id AND status <> 'new'
                 ORDER BY created_at DESC, job_id DESC
                 LIMIT $2) AS j)::text AS jobs
  FROM unnest($1::text[]) AS p(project_id);

-- name: project_pages
-- Pages of many projects' streams in one query: the events of project r.project_id after
-- position r.after_position, at most r.lim of them, per row of the arrays. A range of pairs,
-- as in project_tail: the inner query is planned once for any project, and with
-- "project_id = r.project_id AND position > r.after_position" it walked the primary key even
-- in a plan made for the arrays' values.
SELECT r.n, e.position, e.job_id, e.project_id, e.seq, e.event_id, e.type, e.occurred_at,
       e.actor, e.data
  FROM unnest($1::text[], $2::bigint[], $3::integer[]) WITH ORDINALITY AS r(project_id, after_position, lim, n)
 CROSS JOIN LATERAL (
       SELECT * FROM events
        WHERE (events.project_id, events.position) > (r.project_id, r.after_position)
          AND (events.project_id, events.position) <= (r.project_id, 9223372036854775807)
        ORDER BY events.project_id, events.position
        LIMIT r.lim) AS e
 ORDER BY r.n, e.position;

-- name: log_pages
-- Pages of the whole log after several positions in one query.
SELECT r.n, e.position, e.job_id, e.project_id, e.seq, e.event_id, e.type, e.occurred_at,
       e.actor, e.data
  FROM unnest($1::bigint[], $2::integer[]) WITH ORDINALITY AS r(after_position, lim, n)
 CROSS JOIN LATERAL (
       SELECT * FROM events
        WHERE events.position > r.after_position
        ORDER BY events.position
        LIMIT r.lim) AS e
 ORDER BY r.n, e.position;

-- name: consumer_create
-- Create a consumer, or return the existing one of that name (the caller checks it matches).
-- DO UPDATE (of nothing) rather than DO NOTHING: it waits for a concurrent insert of the same
-- name and returns that row, where DO NOTHING would return nothing to the loser of the race.
INSERT INTO consumers (name, owner_id, project_id, position)
VALUES ($1, $2, $3, $4)
ON CONFLICT (name) DO UPDATE SET name = excluded.name
RETURNING name, owner_id, project_id, position, acks, created_at, updated_at,
          (xmax = 0) AS created;

-- name: consumer_get
SELECT name, owner_id, project_id, position, acks, created_at, updated_at, false AS created
  FROM consumers WHERE name = $1;

-- name: consumer_ack
-- Move a consumer's position forward (never back: a late or repeated ack changes nothing).
UPDATE consumers
   SET position = greatest(position, $2), acks = acks + 1, updated_at = now()
 WHERE name = $1 AND owner_id = $3
RETURNING name, owner_id, project_id, position, acks, created_at, updated_at, false AS created;

-- name: consumer_delete
DELETE FROM consumers WHERE name = $1 AND owner_id = $2 RETURNING name;

-- name: project_tail
-- One project's events after a position, in position order (the project's stream). Written as
-- a range of (project_id, position) pairs, in that index's order, which no other index gives:
-- with "project_id = $1 AND position > $2", the generic plan that PostgreSQL settles on after a
-- few executions of the prepared statement walked the primary key from the cursor and skipped
-- the other projects' events, through the rest of the log for a small project
-- (tests/common/test_tail.py).
SELECT position, job_id, project_id, seq, event_id, type, occurred_at, actor, data
  FROM events
 WHERE (project_id, position) > ($1, $2)
   AND (project_id, position) <= ($1, 9223372036854775807)
 ORDER BY project_id, position
 LIMIT $3;

-- name: audit_subscription
-- A subscription by an auditor through the gateway, recorded when it starts (a stream has no
-- end to count rows at): the stream and the cursor are in `filters`.
INSERT INTO audit_reads (auditor, roles, method, endpoint, path, filters, status, completed,
                         finished_at)
VALUES ($1, $2, 'SUBSCRIBE', '/ws', '/ws', $3::jsonb, 101, true, now())
RETURNING id;

-- name: active_job_counts
-- Unfinished jobs by status, for the export_jobs metric (served by jobs_unfinished, 0002).
SELECT status, count(*) AS count
  FROM jobs
 WHERE status IN ('queued', 'running', 'cancelling')
 GROUP BY status;
