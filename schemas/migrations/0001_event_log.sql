-- 0001: the event log, the guards that make it append-only and ordered, and the jobs projection.
--
-- Every rule a client relies on is enforced here, in the database, so that no writer (a bug in
-- the export service, a second deployment, a person with psql) can break it:
--   * per-job seq is contiguous from 1 and every event links to the hash of the one before;
--   * at most one outcome per job; nothing after failed or cancelled; only the download phase's
--     events after completed;
--   * events are never updated, deleted or truncated;
--   * global positions are assigned in commit order, so a reader tailing by position never skips
--     an event that commits late (see events_serialize_appends below).

CREATE TABLE events (
    position     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id       uuid        NOT NULL,
    seq          integer     NOT NULL CHECK (seq >= 1),
    event_id     uuid        NOT NULL,
    type         text        NOT NULL CHECK (type LIKE '%:%'),
    data         json        NOT NULL,
    actor        text        NOT NULL,
    project_id   text        NOT NULL,
    owner_id     text        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    tx_id        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    prev_hash    bytea       NOT NULL,
    hash         bytea       NOT NULL,
    CONSTRAINT events_job_seq UNIQUE (job_id, seq),
    CONSTRAINT events_event_id UNIQUE (event_id)
);

COMMENT ON TABLE events IS 'Append-only log of export job events; see schemas/migrations/0001.';
COMMENT ON COLUMN events.data IS 'Payload JSON text exactly as written (json, not jsonb: hashed and served verbatim)';
COMMENT ON COLUMN events.tx_id IS 'Transaction that wrote the event';

-- One outcome per job, whatever else goes wrong: a unique index cannot be raced.
CREATE UNIQUE INDEX events_one_outcome ON events (job_id)
    WHERE type IN ('export:completed', 'export:failed', 'export:cancelled');

CREATE INDEX events_project_position ON events (project_id, position);


-- The hash of one event. schemas/chain.py computes the same bytes; a test holds them together.
CREATE FUNCTION event_hash_field(value text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN octet_length(value)::text || ':' || value || ',';

CREATE FUNCTION event_hash(
    prev_hash bytea, job_id uuid, seq integer, event_id uuid, type text, actor text,
    project_id text, owner_id text, occurred_at timestamptz, data text
) RETURNS bytea
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN sha256(prev_hash || convert_to(
        event_hash_field(job_id::text)
        || event_hash_field(seq::text)
        || event_hash_field(event_id::text)
        || event_hash_field(type)
        || event_hash_field(actor)
        || event_hash_field(project_id)
        || event_hash_field(owner_id)
        || event_hash_field((extract(epoch FROM occurred_at) * 1000000)::bigint::text)
        || event_hash_field(data),
        'UTF8'));


-- Each new event must follow the job's previous one: contiguous seq, same project and owner,
-- increasing position, an allowed transition; then it is chained to the previous hash.
CREATE FUNCTION events_check_and_chain() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    prev record;
    after_completion CONSTANT text[] := ARRAY[
        'export:download-started', 'export:download-progress',
        'export:download-completed', 'export:archive-expired'];
BEGIN
    IF NEW.seq = 1 THEN
        IF NEW.type = ANY (after_completion) THEN
            RAISE EXCEPTION 'job % has not completed: % refused', NEW.job_id, NEW.type
                USING ERRCODE = 'EL002';
        END IF;
        NEW.prev_hash := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
    ELSE
        SELECT e.type, e.hash, e.project_id, e.owner_id, e.position, e.seq INTO prev
          FROM events e
         WHERE e.job_id = NEW.job_id AND e.seq = NEW.seq - 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'event % of job % does not follow an event %', NEW.seq, NEW.job_id,
                NEW.seq - 1 USING ERRCODE = 'EL001';
        END IF;
        IF prev.project_id <> NEW.project_id OR prev.owner_id <> NEW.owner_id THEN
            RAISE EXCEPTION 'event % of job % names another project or owner than the job',
                NEW.seq, NEW.job_id USING ERRCODE = 'EL004';
        END IF;
        IF NEW.position <= prev.position THEN
            RAISE EXCEPTION 'event % of job % would precede event % in the global order',
                NEW.seq, NEW.job_id, prev.seq USING ERRCODE = 'EL001';
        END IF;
        IF prev.type IN ('export:failed', 'export:cancelled') THEN
            RAISE EXCEPTION 'job % ended with %: % refused', NEW.job_id, prev.type, NEW.type
                USING ERRCODE = 'EL002';
        ELSIF prev.type = 'export:completed' OR prev.type = ANY (after_completion) THEN
            IF NOT NEW.type = ANY (after_completion) THEN
                RAISE EXCEPTION 'job % has completed: % refused', NEW.job_id, NEW.type
                    USING ERRCODE = 'EL002';
            END IF;
        ELSIF NEW.type = ANY (after_completion) THEN
            RAISE EXCEPTION 'job % has not completed: % refused', NEW.job_id, NEW.type
                USING ERRCODE = 'EL002';
        END IF;
        NEW.prev_hash := prev.hash;
    END IF;
    NEW.hash := event_hash(NEW.prev_hash, NEW.job_id, NEW.seq, NEW.event_id, NEW.type, NEW.actor,
                           NEW.project_id, NEW.owner_id, NEW.occurred_at, NEW.data::text);
    RETURN NEW;
END
$$;

CREATE TRIGGER events_check_and_chain BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_check_and_chain();


-- Positions come from an identity sequence, and sequence values are handed out when rows are
-- formed, not when transactions commit: without care, a reader can see position 11 committed
-- while position 10 is still in flight, move its cursor past 10 and never read it. Every
-- statement that inserts events therefore first takes one transaction-scoped advisory lock,
-- before any position is drawn, and keeps it until its transaction has committed (locks are
-- released after the commit is visible). Positions are thereby handed out in commit order, and
-- "everything up to the highest committed position is visible" holds for every reader.
-- The cost is that appending transactions run their insert-to-commit part one at a time; batched
-- appends (many events per transaction) make that cheap. See the benchmark in bench/.
CREATE FUNCTION events_serialize_appends() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1162628167, 1);  -- 'EVLG', appends
    RETURN NULL;
END
$$;

CREATE TRIGGER events_serialize_appends BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_serialize_appends();


-- Append-only: the database refuses to change or remove history.
CREATE FUNCTION events_refuse_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP USING ERRCODE = 'EL003';
END
$$;

CREATE TRIGGER events_no_update_or_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
REVOKE UPDATE, DELETE, TRUNCATE ON events FROM PUBLIC;


-- The jobs projection: fold(events) of each job, written in the same transaction as its events,
-- for queries and work claiming. It can be rebuilt from the log at any time.
CREATE TABLE jobs (
    job_id         uuid        PRIMARY KEY,
    project_id     text        NOT NULL,
    owner_id       text        NOT NULL,
    status         text        NOT NULL,
    last_seq       integer     NOT NULL DEFAULT 0,
    last_position  bigint,
    state          json        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX jobs_project_created ON jobs (project_id, created_at DESC, job_id);
CREATE INDEX jobs_owner_created ON jobs (owner_id, created_at DESC, job_id);
CREATE INDEX jobs_queued ON jobs (created_at) WHERE status = 'queued';


-- Append events to one or many jobs in one transaction (the unit of group commit).
--
-- Appends are given as parallel arrays (a_*); their events as parallel arrays (e_*), all events of
-- append 1 first, then those of append 2, and so on, a_counts[i] events for append i. Callers sort
-- appends by job id, so that concurrent batches lock job rows in one order. Per append the
-- result is one of:
--   ok        its events are stored as seqs current_seq - n + 1 .. current_seq;
--   duplicate every event id was stored before: nothing written, the stored seqs returned;
--   conflict  the job's last seq is current_seq, not the expected one: nothing written;
--   closed    the job has ended, or an event of the download phase came before completion.
-- A refused append does not stop the others. a_states carries the job's folded state after the
-- append (schemas.fold, computed by the caller from the state at the expected seq).
CREATE FUNCTION append_events(
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
           OR (job.status <> 'completed' AND types && post) THEN
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
