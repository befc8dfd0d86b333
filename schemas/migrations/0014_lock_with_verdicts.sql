-- 0014: append_events locks the job rows and works out its verdicts in one statement, and
-- updates the projection by the rows' physical addresses.
--
-- In 0012 a call took the job row locks in one statement (PERFORM ... FOR UPDATE), then read
-- the same rows again by key for its verdicts, checked for a job named twice and for the
-- numbering of the appends in two more, and updated each job's row after a third lookup by
-- key. Now the locking query is a WITH query of the verdicts' statement: SELECT ... FOR UPDATE
-- returns each row as it is once locked (the latest committed version, as the separate read
-- saw it), the verdicts join those rows, and the same statement counts the distinct jobs and
-- finds the lowest and highest append numbers. The update then finds each row by the ctid the lock returned:
-- nobody else may change a row this transaction has locked, so the address holds until the
-- update, which is the call's only change to the row. Rows are still locked in job id order.
--
-- Measured in interleaved pairs (local PostgreSQL 15, 2-core AMD EPYC; each run a fresh
-- database, a 4 s closed loop of 1,000 jobs, CHECKPOINT, then 8 s measured; CPU from /proc):
--   * closed loop of 1,000 jobs (about 170 appends per transaction), seven pairs: the machine
--     beside the writer's process spent 30.3 to 33.6 µs of CPU per append against 31.1 to 35.2,
--     less in every pair (0.3 to 3.7 µs, 1.9 on average);
--   * 20,000 events/s offered by 1,000 jobs (about 32 appends per transaction), six pairs:
--     40.5 to 42.9 µs against 40.5 to 45.3, less in five pairs and equal in one; in the last
--     three, p50 3.8 to 4.1 ms against 4.0 to 4.3 and p99 8.9 to 12.9 ms against 10.6 to 27.5.
-- The writer's process is unchanged. Four of the closed-loop pairs ran a first form without the
-- closer checks of the numbering below.
--
-- The numbering of the appends is checked more closely: 0012 took a number below 1 in place of
-- a missing one (numbers -1 and 2 for two appends) and a NULL count for a right one.
--
-- The signature, the answers and the settings are those of 0012.

CREATE OR REPLACE FUNCTION append_events(
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
    e_seqs        integer[],
    e_prevs       bytea[],
    e_hashes      bytea[],
    notify        boolean DEFAULT true
) RETURNS TABLE (
    append_no      integer,
    result         text,
    current_seq    integer,
    first_position bigint,
    last_position  bigint
)
LANGUAGE plpgsql
-- Planned once per session (see 0006), and by index (see 0007).
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
-- See 0011.
SET backend_flush_after = '256kB'
AS $$
DECLARE
    -- One entry per append (by append number), worked out before the append lock.
    v_outcome text[];
    v_expires boolean[];
    v_jseq    integer[];
    v_tids    tid[];
    v_counted boolean;
    v_distinct bigint;
    v_min_no  integer;
    v_max_no  integer;
BEGIN
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
    -- Every job row lock, in job id order, then the verdicts, before the append lock
    -- (events_serialize_appends, held until commit): locked rows are read as they are once
    -- locked, so these see every append committed before ours. One verdict per append that has
    -- events, by its number.
    WITH locked AS MATERIALIZED (
        SELECT jobs.ctid AS tid, jobs.job_id, jobs.last_seq, jobs.status
          FROM jobs JOIN unnest(a_job_ids) AS wanted(job_id) ON jobs.job_id = wanted.job_id
         ORDER BY jobs.job_id
           FOR UPDATE OF jobs
    ),
    flags AS (
        SELECT e.no, count(*) AS n,
               bool_and(e.type IN ('export:download-started', 'export:download-progress',
                                   'export:download-completed', 'export:archive-expired'))
                   AS all_post,
               bool_or(e.type IN ('export:download-started', 'export:download-progress',
                                  'export:download-completed', 'export:archive-expired'))
                   AS any_post,
               bool_or(e.type = 'export:completed') AS completes,
               bool_or(e.type = 'export:archive-expired') AS expires,
               -- The append's own events must follow each other as the log allows (see 0006):
               -- one that does not is refused alone, instead of failing the statement.
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
        SELECT f.no, j.last_seq AS j_seq, j.tid, f.expires,
               f.n IS NOT DISTINCT FROM a_counts[f.no] AS counted,
               CASE
                   WHEN j.last_seq IS DISTINCT FROM a_expected[f.no] OR a_statuses[f.no] = ''
                        THEN 'mismatch'
                   WHEN j.status IN ('failed', 'cancelled')
                     OR (j.status = 'completed' AND NOT f.all_post)
                     OR (j.status <> 'completed' AND f.any_post)
                     OR (j.status = 'cancelling' AND f.completes)
                     OR f.disordered THEN 'closed'
                   ELSE 'ok'
               END AS outcome
          FROM flags f
          LEFT JOIN locked j ON j.job_id = a_job_ids[f.no]
    )
    SELECT array_agg(v.outcome ORDER BY v.no), array_agg(v.expires ORDER BY v.no),
           array_agg(v.j_seq ORDER BY v.no), array_agg(v.tid ORDER BY v.no), bool_and(v.counted),
           (SELECT count(DISTINCT j) FROM unnest(a_job_ids) AS j),
           (SELECT min(f) FROM unnest(e_appends) AS f),
           (SELECT max(f) FROM unnest(e_appends) AS f)
      INTO v_outcome, v_expires, v_jseq, v_tids, v_counted, v_distinct, v_min_no, v_max_no
      FROM verdict v;
    IF cardinality(a_job_ids) IS DISTINCT FROM v_distinct THEN
        RAISE EXCEPTION 'append_events: a job may appear once per call' USING ERRCODE = '22023';
    END IF;
    -- The arrays above have one entry per append only if the appends are numbered 1 to n and
    -- each has as many events as its count says (0012 let a number below 1 through, in place
    -- of one that was missing, and a count that was NULL).
    IF cardinality(v_outcome) IS DISTINCT FROM cardinality(a_job_ids)
       OR v_min_no IS DISTINCT FROM 1
       OR v_max_no IS DISTINCT FROM cardinality(a_job_ids)
       OR NOT v_counted THEN
        RAISE EXCEPTION 'append_events: e_appends must number appends 1 to %, as a_counts says',
            cardinality(a_job_ids) USING ERRCODE = '22023';
    END IF;

    -- The projection, before the append lock (the rows are locked): an 'ok' append writes all
    -- its events, or the statement fails and takes this update back with it.
    UPDATE jobs
       SET last_seq = a_expected[w.no] + a_counts[w.no],
           status = a_statuses[w.no], state = a_states[w.no]::json, updated_at = now(),
           archive_expired = jobs.archive_expired OR v_expires[w.no]
      FROM unnest(v_tids) WITH ORDINALITY AS w(tid, no)
     WHERE jobs.ctid = w.tid AND v_outcome[w.no] = 'ok';

    -- Under the append lock from here to commit: write the rows and the answer.
    RETURN QUERY
    WITH
    inserted AS (
        INSERT INTO events (job_id, seq, event_id, type, data, actor, project_id, owner_id,
                            occurred_at, prev_hash, hash)
        SELECT a_job_ids[r.no], r.seq, r.id, r.type, r.data::json, r.actor,
               a_project_ids[r.no], a_owner_ids[r.no], r.occurred, r.prev_hash, r.hash
          FROM unnest(e_appends, e_seqs, e_ids, e_types, e_data, e_actors, e_occurred, e_prevs,
                      e_hashes)
               WITH ORDINALITY AS r(no, seq, id, type, data, actor, occurred, prev_hash, hash,
                                    idx)
         WHERE v_outcome[r.no] = 'ok'
         ORDER BY r.idx
        RETURNING events.job_id, events.position
    ),
    -- A retry of an append that was stored already is not a conflict: say where its events
    -- are. Only refused appends are looked up, each event by its id.
    stored AS (
        SELECT a_job_ids[e.no] AS job_id, x.seq, x.position
          FROM unnest(e_appends, e_ids) AS e(no, id)
          JOIN events x ON x.event_id = e.id
         WHERE v_outcome[e.no] = 'mismatch'
    ),
    -- One row per append: its number, and the positions of what it wrote or of what was
    -- stored before, brought to it by grouping on the job (once per call) instead of a join.
    per_append AS MATERIALIZED (
        SELECT u.job_id, max(u.no)::integer AS no,
               min(u.position) FILTER (WHERE u.source = 'inserted') AS first_pos,
               max(u.position) FILTER (WHERE u.source = 'inserted') AS last_pos,
               count(*) FILTER (WHERE u.source = 'stored')::integer AS n_stored,
               max(u.seq) AS stored_seq,
               min(u.position) FILTER (WHERE u.source = 'stored') AS stored_first,
               max(u.position) FILTER (WHERE u.source = 'stored') AS stored_last
          FROM (SELECT c.job_id, c.no, NULL::bigint AS position, NULL::integer AS seq,
                       'call' AS source
                  FROM unnest(a_job_ids) WITH ORDINALITY AS c(job_id, no)
                UNION ALL
                SELECT i.job_id, NULL, i.position, NULL, 'inserted' FROM inserted i
                UNION ALL
                SELECT s.job_id, NULL, s.position, s.seq, 'stored' FROM stored s) u
         GROUP BY u.job_id
    ),
    -- At most one NOTIFY per call, and none when nothing was written.
    notified AS (
        SELECT count(pg_notify('exportlog_events', '')) AS n
         WHERE notify AND 'ok' = ANY (v_outcome)
    )
    SELECT p.no,
           CASE
               WHEN v_outcome[p.no] <> 'mismatch' THEN v_outcome[p.no]
               WHEN p.n_stored = a_counts[p.no] THEN 'duplicate'
               ELSE 'conflict'
           END,
           CASE
               WHEN v_outcome[p.no] = 'ok' THEN a_expected[p.no] + a_counts[p.no]
               WHEN v_outcome[p.no] = 'closed' THEN v_jseq[p.no]
               WHEN p.n_stored = a_counts[p.no] THEN p.stored_seq
               ELSE coalesce(v_jseq[p.no], 0)
           END,
           CASE WHEN v_outcome[p.no] = 'ok' THEN p.first_pos
                WHEN p.n_stored = a_counts[p.no] THEN p.stored_first END,
           CASE WHEN v_outcome[p.no] = 'ok' THEN p.last_pos
                WHEN p.n_stored = a_counts[p.no] THEN p.stored_last END
      FROM per_append p
     -- Evaluated once (an init plan), so that the NOTIFY is sent.
     WHERE (SELECT n FROM notified) IS NOT NULL
     ORDER BY p.no;

    -- A refused first append leaves its placeholder row behind: remove it.
    IF 0 = ANY (a_expected) THEN
        DELETE FROM jobs USING unnest(a_job_ids) AS refused(job_id)
         WHERE jobs.job_id = refused.job_id AND jobs.status = 'new';
    END IF;
END
$$;


