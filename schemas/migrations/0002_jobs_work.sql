-- 0002: running jobs. Work claiming under leases, idempotent job creation, and the rule that a
-- job whose cancel was requested can no longer complete.

-- A worker claims a job by taking its lease; a lease not renewed in time lets another worker
-- take the job over. attempts counts claims, so a job that kills its workers stops being retried.
ALTER TABLE jobs
    ADD COLUMN lease_owner      text,
    ADD COLUMN lease_expires_at timestamptz,
    ADD COLUMN attempts         integer NOT NULL DEFAULT 0;

-- Claimable work: queued jobs, and started ones whose lease has run out.
CREATE INDEX jobs_unfinished ON jobs (created_at)
    WHERE status IN ('queued', 'running', 'cancelling');

-- A client retrying "start an export" with the same Idempotency-Key gets the same job.
CREATE TABLE idempotency_keys (
    owner_id     text        NOT NULL,
    project_id   text        NOT NULL,
    key          text        NOT NULL,
    request_hash text        NOT NULL,
    job_id       uuid        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_id, project_id, key)
);


-- As in 0001, plus: once a cancel has been requested (status 'cancelling'), 'export:completed'
-- is refused, so a cancel that commits first always wins the race of seeds/002.
CREATE OR REPLACE FUNCTION append_events(
    a_job_ids     uuid[],
    a_expected    integer[],
    a_counts      integer[],
    a_project_ids text[],
    a_owner_ids   text[],
    a_statuses    text[],
    a_states      text[],
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
LANGUAGE plpgsql AS $$
DECLARE
    n_appends    integer := coalesce(cardinality(a_job_ids), 0);
    i            integer;
    lo           integer := 1;
    hi           integer;
    job          record;
    n_stored     integer;
    new_seq      integer;
    outcome      text;
    first_pos    bigint;
    last_pos     bigint;
    any_ok       boolean := false;
    placeholders boolean := false;
    types        text[];
    post         CONSTANT text[] := ARRAY[
        'export:download-started', 'export:download-progress',
        'export:download-completed', 'export:archive-expired'];
BEGIN
    -- Every job row lock is taken before the first events insert takes the append lock, in the
    -- callers' (sorted) order, so that batches never wait on each other in a cycle. A single
    -- append takes its one row lock below, still before its insert.
    IF n_appends > 1 THEN
        FOR i IN 1 .. n_appends LOOP
            IF a_expected[i] = 0 THEN
                INSERT INTO jobs (job_id, project_id, owner_id, status, state)
                VALUES (a_job_ids[i], a_project_ids[i], a_owner_ids[i], 'new', '{}')
                ON CONFLICT (job_id) DO NOTHING;
            END IF;
            PERFORM 1 FROM jobs WHERE jobs.job_id = a_job_ids[i] FOR UPDATE;
        END LOOP;
    ELSIF n_appends = 1 AND a_expected[1] = 0 THEN
        INSERT INTO jobs (job_id, project_id, owner_id, status, state)
        VALUES (a_job_ids[1], a_project_ids[1], a_owner_ids[1], 'new', '{}')
        ON CONFLICT (job_id) DO NOTHING;
    END IF;

    FOR i IN 1 .. n_appends LOOP
        hi := lo + a_counts[i] - 1;
        types := e_types[lo:hi];
        first_pos := NULL;
        last_pos := NULL;

        SELECT jobs.project_id, jobs.owner_id, jobs.status, jobs.last_seq INTO job
          FROM jobs WHERE jobs.job_id = a_job_ids[i] FOR UPDATE;

        IF NOT FOUND OR job.last_seq <> a_expected[i] THEN
            -- A retry of an append that was stored already is not a conflict: answer with
            -- where its events are. (When the seq matches, the events cannot be stored yet.)
            SELECT count(*)::integer, max(ev.seq), min(ev.position), max(ev.position)
              INTO n_stored, new_seq, first_pos, last_pos
              FROM events ev
             WHERE ev.event_id = ANY (e_ids[lo:hi]);
            IF n_stored = a_counts[i] THEN
                outcome := 'duplicate';
            ELSE
                outcome := 'conflict';
                new_seq := coalesce(job.last_seq, 0);
                first_pos := NULL;
                last_pos := NULL;
            END IF;
        ELSIF job.status IN ('failed', 'cancelled')
           OR (job.status = 'completed' AND NOT types <@ post)
           OR (job.status <> 'completed' AND types && post)
           OR (job.status = 'cancelling' AND 'export:completed' = ANY (types)) THEN
            outcome := 'closed';
            new_seq := job.last_seq;
        ELSE
            WITH stored AS (
                INSERT INTO events (job_id, seq, event_id, type, data, actor, project_id,
                                    owner_id, occurred_at)
                SELECT a_job_ids[i], a_expected[i] + t.k::integer, t.id, t.type, t.data::json,
                       t.actor, job.project_id, job.owner_id, t.occurred
                  FROM unnest(e_ids[lo:hi], types, e_data[lo:hi], e_actors[lo:hi],
                              e_occurred[lo:hi])
                       WITH ORDINALITY AS t(id, type, data, actor, occurred, k)
                 ORDER BY t.k
                RETURNING events.position
            )
            SELECT min(stored.position), max(stored.position) INTO first_pos, last_pos
              FROM stored;

            new_seq := a_expected[i] + a_counts[i];
            UPDATE jobs
               SET last_seq = new_seq, last_position = last_pos, status = a_statuses[i],
                   state = a_states[i]::json, updated_at = now()
             WHERE jobs.job_id = a_job_ids[i];
            outcome := 'ok';
            any_ok := true;
        END IF;

        IF outcome <> 'ok' AND a_expected[i] = 0 THEN
            placeholders := true;
        END IF;
        append_no := i;
        result := outcome;
        current_seq := new_seq;
        first_position := first_pos;
        last_position := last_pos;
        RETURN NEXT;
        lo := hi + 1;
    END LOOP;

    IF placeholders THEN
        -- A refused first append leaves its placeholder row behind: remove it.
        DELETE FROM jobs WHERE jobs.job_id = ANY (a_job_ids) AND jobs.status = 'new';
    END IF;

    IF any_ok AND notify THEN
        PERFORM pg_notify('exportlog_events', '');
    END IF;
END
$$;
