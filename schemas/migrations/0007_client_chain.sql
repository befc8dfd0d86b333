-- 0007: the writer brings each event's hash; the database checks it instead of computing it.
--
-- In 0006 append_events worked the hash chain out itself (a recursive query over the batch, and
-- an index probe per append for the job's last hash) and events_verify_inserted then computed
-- every hash a second time to check it. The writer (services/common/eventlog.py) already folds
-- each append from the job's state at the expected seq; it now also chains the append from the
-- job's last hash, with schemas/chain.py, and append_events takes the rows as they are. Nothing
-- is trusted: events_verify_inserted still recomputes every hash, checks every link to the
-- stored predecessor, the seqs, the project and owner and the transition, and fails the
-- statement on the first broken rule. A row without a hash is still chained by the row trigger
-- of 0001, so a writer that does not know the chain may leave it to the database.
--
-- Two costs found in 0006's generic plans go as well:
--   * the job row locks were taken with "job_id = ANY (array)", which the generic plan ran as a
--     scan of jobs with a linear search of the array per row: quadratic in the batch on a small
--     table; they are now a join;
--   * the job's last hash was read with the (job_id, position) index and a filter on seq, which
--     reads every event of the job: an append to a long job cost more the longer the job;
--   * a generic plan is made once per session with the statistics of that moment: a session
--     that first appended while events was nearly empty (a new deployment, a benchmark) kept a
--     plan that found each row's predecessor by reading the whole table, until the next
--     ANALYZE. These statements only ever touch rows by key, so they are planned without
--     sequential scans, whatever the statistics say.


-- As in 0006, with the predecessor of each row found as "the job's latest event before it",
-- which only the (job_id, seq) key can answer in order: with "seq = n.seq - 1" the planner,
-- short of statistics, was as happy to walk (job_id, position) and filter on seq, reading every
-- event of the job for each row.
CREATE OR REPLACE FUNCTION events_verify_inserted() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off
    AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.job_id, n.seq, n.type, p.type AS prev_type, v.code, v.reason INTO bad
      FROM new_rows n
      LEFT JOIN LATERAL (
          SELECT e.seq, e.type, e.project_id, e.owner_id, e.position, e.hash
            FROM events e
           WHERE e.job_id = n.job_id AND e.seq < n.seq
           ORDER BY e.seq DESC
           LIMIT 1
      ) p ON true
      CROSS JOIN LATERAL (
          SELECT CASE
              WHEN n.seq > 1 AND p.seq IS DISTINCT FROM n.seq - 1 THEN 'EL001'
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
              WHEN n.seq > 1 AND p.seq IS DISTINCT FROM n.seq - 1
                   THEN 'does not follow an event ' || (n.seq - 1)
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


DROP FUNCTION append_events(uuid[], integer[], integer[], text[], text[], text[], text[],
                            integer[], uuid[], text[], text[], text[], timestamptz[], boolean);

-- As in 0006, with per event its seq (e_seqs), the hash of the event before it (e_prevs) and
-- its own (e_hashes), NULL for both when the database is to chain it. a_statuses is '' for an
-- append whose state the writer does not know: it expects a seq the job is not at, so it can
-- only be a conflict or a duplicate (were the job to reach that seq meanwhile, the answer is
-- still conflict: the writer has nothing to fold the projection from).
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
-- Planned once per session (see 0006), and by index: see events_verify_inserted below.
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
DECLARE
    -- One entry per append (by append number), worked out before the append lock.
    v_outcome text[];
    v_expires boolean[];
    v_jseq    integer[];
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
    PERFORM 1
       FROM jobs JOIN unnest(a_job_ids) AS wanted(job_id) ON jobs.job_id = wanted.job_id
      ORDER BY jobs.job_id
        FOR UPDATE OF jobs;

    -- The verdicts, before the append lock (events_serialize_appends, held until commit): the
    -- rows are locked, so these see every append committed before ours.
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
        SELECT x.no::integer AS no, j.last_seq AS j_seq, f.expires,
               CASE
                   WHEN j.last_seq IS DISTINCT FROM x.expected OR x.status = '' THEN 'mismatch'
                   WHEN j.status IN ('failed', 'cancelled')
                     OR (j.status = 'completed' AND NOT f.all_post)
                     OR (j.status <> 'completed' AND f.any_post)
                     OR (j.status = 'cancelling' AND f.completes)
                     OR f.disordered THEN 'closed'
                   ELSE 'ok'
               END AS outcome
          FROM unnest(a_job_ids, a_expected, a_statuses) WITH ORDINALITY
               AS x(job_id, expected, status, no)
          JOIN flags f ON f.no = x.no
          LEFT JOIN jobs j ON j.job_id = x.job_id
    )
    SELECT array_agg(v.outcome ORDER BY v.no), array_agg(v.expires ORDER BY v.no),
           array_agg(v.j_seq ORDER BY v.no)
      INTO v_outcome, v_expires, v_jseq
      FROM verdict v;

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
    stored AS (
        SELECT e.no, count(*)::integer AS n_stored, max(x.seq) AS seq,
               min(x.position) AS first_pos, max(x.position) AS last_pos
          FROM unnest(e_appends, e_ids) AS e(no, id)
          JOIN events x ON x.event_id = e.id
         WHERE v_outcome[e.no] = 'mismatch'
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
        DELETE FROM jobs USING unnest(a_job_ids) AS refused(job_id)
         WHERE jobs.job_id = refused.job_id AND jobs.status = 'new';
    END IF;
END
$$;
