-- 0006: group commit. Appends of many jobs are written by a handful of set-based statements
-- instead of a loop with a statement per append and a trigger call per event, so that one
-- transaction can carry hundreds of appends (issue 8: 20,000 events/s from 1,000 jobs).
--
-- The rules of 0001/0002 stay the database's, for every writer:
--   * rows that arrive with their hash (append_events computes the chain in its insert) are
--     checked once per statement by events_verify_inserted, a set-based query over the
--     statement's new rows: predecessor present, same project and owner, increasing position,
--     an allowed transition, prev_hash linking to the predecessor's hash, hash recomputed;
--   * rows that arrive without a hash (a person with psql) go through the row trigger of 0001
--     first, which chains them and names the broken rule, and then through the same check.


-- event_hash reads a timestamptz's epoch and converts text to UTF-8, which PostgreSQL rates
-- stable, not immutable; declared immutable it was never inlined, and every hash cost a call of
-- a SQL function per field. Declared as what it is, it is inlined into the queries that use it.
ALTER FUNCTION event_hash(bytea, uuid, integer, uuid, text, text, text, text, timestamptz, text)
    STABLE;


-- The jobs row of a running job is rewritten by every append. jobs_archive_live (0005) had the
-- state in its predicate, which made state an indexed column: no update could be HOT, and each
-- one wrote an entry into all six indexes. The predicate now reads a column of its own, set by
-- append_events when an append carries export:archive-expired (and by a rebuild of the
-- projection from the state), whose value changes once in a job's life; with room left on each
-- page, an append's update of the projection stays on its page and touches no index.
ALTER TABLE jobs ADD COLUMN archive_expired boolean NOT NULL DEFAULT false;
UPDATE jobs SET archive_expired = true WHERE (state ->> 'archiveExpired') = 'true';
ALTER TABLE jobs SET (fillfactor = 70);
DROP INDEX jobs_archive_live;
CREATE INDEX jobs_archive_live ON jobs (created_at, job_id)
    WHERE status = 'completed' AND NOT archive_expired;


-- The row trigger runs only for rows without a hash; the WHEN clause is evaluated without
-- calling plpgsql, so a row that brings its hash costs no trigger call.
DROP TRIGGER events_check_and_chain ON events;
CREATE TRIGGER events_check_and_chain BEFORE INSERT ON events
    FOR EACH ROW WHEN (NEW.hash IS NULL) EXECUTE FUNCTION events_check_and_chain();


-- Every inserted row, checked in one query per statement. The statement's rows are visible in
-- events here, so the predecessor of each row is found whether it was inserted before or by the
-- same statement.
CREATE FUNCTION events_verify_inserted() RETURNS trigger
    LANGUAGE plpgsql
    -- Planned once per session (see append_events below).
    SET plan_cache_mode = force_generic_plan
    AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.job_id, n.seq, n.type, p.type AS prev_type, v.code, v.reason INTO bad
      FROM new_rows n
      LEFT JOIN events p ON p.job_id = n.job_id AND p.seq = n.seq - 1
      CROSS JOIN LATERAL (
          SELECT CASE
              WHEN n.seq > 1 AND p.job_id IS NULL THEN 'EL001'
              WHEN p.project_id <> n.project_id OR p.owner_id <> n.owner_id THEN 'EL004'
              WHEN n.position <= p.position THEN 'EL001'
              WHEN p.type IN ('export:failed', 'export:cancelled') THEN 'EL002'
              WHEN (p.type IS NULL OR p.type NOT IN (
                        'export:completed', 'export:download-started',
                        'export:download-progress', 'export:download-completed',
                        'export:archive-expired'))
                   <> (n.type NOT IN (
                        'export:download-started', 'export:download-progress',
                        'export:download-completed', 'export:archive-expired'))
                   THEN 'EL002'
              WHEN n.prev_hash IS DISTINCT FROM coalesce(p.hash,
                       '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
                   THEN 'EL005'
              WHEN n.hash IS DISTINCT FROM event_hash(
                       n.prev_hash, n.job_id, n.seq, n.event_id, n.type, n.actor, n.project_id,
                       n.owner_id, n.occurred_at, n.data::text)
                   THEN 'EL005'
          END AS code,
          CASE
              WHEN n.seq > 1 AND p.job_id IS NULL THEN 'does not follow an event ' || (n.seq - 1)
              WHEN p.project_id <> n.project_id OR p.owner_id <> n.owner_id
                   THEN 'names another project or owner than the job'
              WHEN n.position <= p.position THEN 'would precede its predecessor in the log'
              WHEN n.prev_hash IS DISTINCT FROM coalesce(p.hash,
                       '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
                   THEN 'does not link to the hash of its predecessor'
              ELSE 'is not allowed here, or its hash is not the hash of its fields'
          END AS reason
      ) v
     WHERE v.code IS NOT NULL
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'event % (%) of job % %', bad.seq, bad.type, bad.job_id, bad.reason
            USING ERRCODE = bad.code,
                  DETAIL = 'previous event: ' || coalesce(bad.prev_type, 'none');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_verify_inserted AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION events_verify_inserted();


-- Append events to many jobs in one transaction: a few set-based statements, whatever the
-- number of appends. As in 0002, but
--   * each job appears at most once per call (callers make a second call in the same
--     transaction for a job's next append; services/common/eventlog.py does);
--   * e_appends names the append (1-based) each event belongs to; the events of an append are
--     given in seq order, and the appends in any order;
--   * the hash chain is computed here, in the insert, so no row trigger runs.
-- Per append the result is one of:
--   ok        its events are stored as seqs current_seq - n + 1 .. current_seq;
--   duplicate every event id was stored before: nothing written, the stored seqs returned;
--   conflict  the job's last seq is current_seq, not the expected one: nothing written;
--   closed    the job has ended, its cancel was requested and the append completes it, or an
--             event of the download phase came before completion.
-- A refused append does not stop the others. a_states carries the job's folded state after the
-- append (schemas.fold, computed by the caller from the state at the expected seq).
DROP FUNCTION append_events(uuid[], integer[], integer[], text[], text[], text[], text[], uuid[],
                            text[], text[], text[], timestamptz[], boolean);

CREATE FUNCTION append_events(
    a_job_ids     uuid[],
    a_expected    integer[],
    a_counts      integer[],
    a_project_ids text[],
    a_owner_ids   text[],
    a_statuses    text[],
    a_states      text[],
    e_appends     integer[],
    e_ids         uuid[],
    e_types       text[],
    e_data        text[],
    e_actors      text[],
    e_occurred    timestamptz[],
    notify        boolean DEFAULT true
) RETURNS TABLE (
    append_no      integer,
    result         text,
    current_seq    integer,
    first_position bigint,
    last_position  bigint
)
LANGUAGE plpgsql
-- Planned once per session. Left to choose, PostgreSQL planned every call afresh (the estimated
-- cost of a plan for "some rows" looks worse than a plan for the call's rows), which with the
-- inlined hash expressions cost milliseconds of CPU per call, more than the writing itself for
-- a small batch. The statements are written so that their generic plans stay linear in the
-- batch size: the batch's rows meet each other by array subscript or hash, never in a loop.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    -- One entry per append (by append number): the verdict, worked out before the append lock.
    v_outcome  text[];
    v_ok       boolean[];
    v_mismatch boolean[];
    v_expires  boolean[];
    v_jseq     integer[];
    v_prev     bytea[];
    v_project  text[];
    v_owner    text[];
    -- One entry per event to insert, in insert order: the rows with their hash chain.
    c_no       integer[];
    c_job      uuid[];
    c_seq      integer[];
    c_id       uuid[];
    c_type     text[];
    c_data     text[];
    c_actor    text[];
    c_occurred timestamptz[];
    c_project  text[];
    c_owner    text[];
    c_prev     bytea[];
    c_hash     bytea[];
BEGIN
    IF cardinality(a_job_ids) IS DISTINCT FROM
       (SELECT count(DISTINCT j) FROM unnest(a_job_ids) AS j) THEN
        RAISE EXCEPTION 'append_events: a job may appear once per call' USING ERRCODE = '22023';
    END IF;

    -- Placeholder rows for new jobs, then every job row lock, in job id order, all before the
    -- insert takes the append lock: concurrent batches never wait on each other in a cycle.
    IF 0 = ANY (a_expected) THEN
        INSERT INTO jobs (job_id, project_id, owner_id, status, state)
        SELECT a.job_id, a.project_id, a.owner_id, 'new', '{}'
          FROM unnest(a_job_ids, a_expected, a_project_ids, a_owner_ids)
               AS a(job_id, expected, project_id, owner_id)
         WHERE a.expected = 0
         ORDER BY a.job_id
        ON CONFLICT (job_id) DO NOTHING;
    END IF;
    PERFORM 1 FROM jobs WHERE jobs.job_id = ANY (a_job_ids) ORDER BY jobs.job_id FOR UPDATE;

    -- The verdicts and the hash chain are worked out here, before the insert takes the append
    -- lock (events_serialize_appends), which is held until commit: only the writing itself is
    -- serialised, and a second batch can do this part while the first one writes. The rows are
    -- locked: these statements' snapshots see every append committed before ours.
    WITH flags AS (
        SELECT e.no,
               bool_and(e.type IN ('export:download-started', 'export:download-progress',
                                   'export:download-completed', 'export:archive-expired'))
                   AS all_post,
               bool_or(e.type IN ('export:download-started', 'export:download-progress',
                                  'export:download-completed', 'export:archive-expired'))
                   AS any_post,
               bool_or(e.type = 'export:completed') AS completes,
               bool_or(e.type = 'export:archive-expired') AS expires,
               -- The append's own events must follow each other as the log allows (nothing
               -- after failed or cancelled; after completed, only the download phase): an
               -- append that breaks this is refused alone here, instead of failing the
               -- statement, and with it every other append of the batch.
               bool_or(e.prev IN ('export:failed', 'export:cancelled')
                       OR (e.prev IN ('export:completed', 'export:download-started',
                                      'export:download-progress', 'export:download-completed',
                                      'export:archive-expired'))
                          <> (e.type IN ('export:download-started', 'export:download-progress',
                                         'export:download-completed', 'export:archive-expired')))
                   AS disordered
          FROM (SELECT a.no, a.type, lag(a.type) OVER (PARTITION BY a.no ORDER BY a.idx) AS prev
                  FROM unnest(e_appends, e_types) WITH ORDINALITY AS a(no, type, idx)) e
         GROUP BY e.no
    ),
    verdict AS (
        SELECT x.no::integer AS no, j.project_id AS j_project, j.owner_id AS j_owner,
               j.last_seq AS j_seq, f.expires,
               coalesce((SELECT pe.hash FROM events pe
                          WHERE pe.job_id = x.job_id AND pe.seq = x.expected),
                        '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
                   AS prev_hash,
               CASE
                   WHEN j.last_seq IS DISTINCT FROM x.expected THEN 'mismatch'
                   WHEN j.status IN ('failed', 'cancelled')
                     OR (j.status = 'completed' AND NOT f.all_post)
                     OR (j.status <> 'completed' AND f.any_post)
                     OR (j.status = 'cancelling' AND f.completes)
                     OR f.disordered THEN 'closed'
                   ELSE 'ok'
               END AS outcome
          FROM unnest(a_job_ids, a_expected) WITH ORDINALITY AS x(job_id, expected, no)
          JOIN flags f ON f.no = x.no
          LEFT JOIN jobs j ON j.job_id = x.job_id
    )
    SELECT array_agg(v.outcome ORDER BY v.no), array_agg(v.outcome = 'ok' ORDER BY v.no),
           array_agg(v.outcome = 'mismatch' ORDER BY v.no), array_agg(v.expires ORDER BY v.no),
           array_agg(v.j_seq ORDER BY v.no), array_agg(v.prev_hash ORDER BY v.no),
           array_agg(v.j_project ORDER BY v.no), array_agg(v.j_owner ORDER BY v.no)
      INTO v_outcome, v_ok, v_mismatch, v_expires, v_jseq, v_prev, v_project, v_owner
      FROM verdict v;

    -- The chain of each accepted append: its first event links to the job's last hash, each
    -- next one to the one before. (By subscript: the same cost whatever the planner thinks of
    -- the batch's size.)
    WITH RECURSIVE
    ev AS (
        SELECT e.no, e.id, e.type, e.data, e.actor, e.occurred,
               row_number() OVER (PARTITION BY e.no ORDER BY e.idx)::integer AS k
          FROM unnest(e_appends, e_ids, e_types, e_data, e_actors, e_occurred)
               WITH ORDINALITY AS e(no, id, type, data, actor, occurred, idx)
    ),
    chain AS (
        SELECT ev.no, ev.k, a_job_ids[ev.no] AS job_id, a_expected[ev.no] + 1 AS seq, ev.id,
               ev.type, ev.data, ev.actor, ev.occurred, v_project[ev.no] AS project_id,
               v_owner[ev.no] AS owner_id, v_prev[ev.no] AS prev_hash,
               event_hash(v_prev[ev.no], a_job_ids[ev.no], a_expected[ev.no] + 1, ev.id,
                          ev.type, ev.actor, v_project[ev.no], v_owner[ev.no], ev.occurred,
                          ev.data) AS hash
          FROM ev
         WHERE ev.k = 1 AND v_ok[ev.no]
        UNION ALL
        SELECT ev.no, ev.k, c.job_id, c.seq + 1, ev.id, ev.type, ev.data, ev.actor,
               ev.occurred, c.project_id, c.owner_id, c.hash,
               event_hash(c.hash, c.job_id, c.seq + 1, ev.id, ev.type, ev.actor,
                          c.project_id, c.owner_id, ev.occurred, ev.data)
          FROM chain c
          JOIN ev ON ev.no = c.no AND ev.k = c.k + 1
    )
    SELECT array_agg(c.no ORDER BY c.no, c.k), array_agg(c.job_id ORDER BY c.no, c.k),
           array_agg(c.seq ORDER BY c.no, c.k), array_agg(c.id ORDER BY c.no, c.k),
           array_agg(c.type ORDER BY c.no, c.k), array_agg(c.data ORDER BY c.no, c.k),
           array_agg(c.actor ORDER BY c.no, c.k), array_agg(c.occurred ORDER BY c.no, c.k),
           array_agg(c.project_id ORDER BY c.no, c.k), array_agg(c.owner_id ORDER BY c.no, c.k),
           array_agg(c.prev_hash ORDER BY c.no, c.k), array_agg(c.hash ORDER BY c.no, c.k)
      INTO c_no, c_job, c_seq, c_id, c_type, c_data, c_actor, c_occurred, c_project, c_owner,
           c_prev, c_hash
      FROM chain c;

    -- Under the append lock from here to commit: write the rows, the projection, the answer.
    RETURN QUERY
    WITH
    verdict AS MATERIALIZED (
        SELECT x.no::integer AS no, x.job_id, x.expected, x.n, x.status, x.state, x.outcome,
               v_expires[x.no] AS expires, v_jseq[x.no] AS j_seq
          FROM unnest(a_job_ids, a_expected, a_counts, a_statuses, a_states, v_outcome)
               WITH ORDINALITY AS x(job_id, expected, n, status, state, outcome, no)
    ),
    inserted AS (
        INSERT INTO events (job_id, seq, event_id, type, data, actor, project_id, owner_id,
                            occurred_at, prev_hash, hash)
        SELECT r.job_id, r.seq, r.id, r.type, r.data::json, r.actor, r.project_id, r.owner_id,
               r.occurred, r.prev_hash, r.hash
          FROM unnest(c_job, c_seq, c_id, c_type, c_data, c_actor, c_occurred, c_project,
                      c_owner, c_prev, c_hash)
               WITH ORDINALITY AS r(job_id, seq, id, type, data, actor, occurred, project_id,
                                    owner_id, prev_hash, hash, idx)
         ORDER BY r.idx
        RETURNING events.job_id, events.position
    ),
    placed AS (
        SELECT i.job_id, min(i.position) AS first_pos, max(i.position) AS last_pos
          FROM inserted i GROUP BY i.job_id
    ),
    updated AS (
        UPDATE jobs
           SET last_seq = v.expected + v.n, last_position = pl.last_pos, status = v.status,
               state = v.state::json, updated_at = now(),
               archive_expired = jobs.archive_expired OR v.expires
          FROM placed pl
          JOIN verdict v ON v.job_id = pl.job_id
         WHERE jobs.job_id = pl.job_id
        RETURNING jobs.job_id
    ),
    -- A retry of an append that was stored already is not a conflict: say where its events are.
    -- (When the seq matches, its events cannot be stored yet.)
    stored AS (
        SELECT e.no, count(*)::integer AS n_stored, max(x.seq) AS seq,
               min(x.position) AS first_pos, max(x.position) AS last_pos
          FROM unnest(e_appends, e_ids) AS e(no, id)
          JOIN events x ON x.event_id = e.id
         WHERE v_mismatch[e.no]
         GROUP BY e.no
    ),
    -- At most one NOTIFY per call, and none when nothing was written.
    notified AS (
        SELECT count(pg_notify('exportlog_events', '')) AS n
         WHERE notify AND EXISTS (SELECT 1 FROM updated)
    )
    SELECT v.no,
           CASE
               WHEN v.outcome <> 'mismatch' THEN v.outcome
               WHEN s.n_stored = v.n THEN 'duplicate'
               ELSE 'conflict'
           END,
           CASE
               WHEN v.outcome = 'ok' THEN v.expected + v.n
               WHEN v.outcome = 'closed' THEN v.j_seq
               WHEN s.n_stored = v.n THEN s.seq
               ELSE coalesce(v.j_seq, 0)
           END,
           CASE WHEN v.outcome = 'ok' THEN pl.first_pos
                WHEN v.outcome = 'mismatch' AND s.n_stored = v.n THEN s.first_pos END,
           CASE WHEN v.outcome = 'ok' THEN pl.last_pos
                WHEN v.outcome = 'mismatch' AND s.n_stored = v.n THEN s.last_pos END
      FROM verdict v
      LEFT JOIN placed pl ON pl.job_id = v.job_id
      LEFT JOIN stored s ON s.no = v.no
     CROSS JOIN notified
     ORDER BY v.no;

    -- A refused first append leaves its placeholder row behind: remove it.
    IF 0 = ANY (a_expected) THEN
        DELETE FROM jobs
         WHERE jobs.job_id = ANY (a_job_ids) AND jobs.status = 'new';
    END IF;
END
$$;
