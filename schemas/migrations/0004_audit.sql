-- 0004: auditing. Indexes for history queries across jobs, and the record of auditors' reads.
--
-- A history query (GET /v1/audit/events) pages through the log by position. It walks one index in
-- position order from its cursor, chosen by its most selective filter: a job, a project (the
-- existing events_project_position), an actor, or an event type; with none of these, the primary
-- key. Filters on several values of one of them walk that index once per value and merge.
-- Building these indexes locks appends out for as long as it takes; on a large log, create them
-- beforehand with CREATE INDEX CONCURRENTLY under the same names (IF NOT EXISTS then skips them).

CREATE INDEX IF NOT EXISTS events_job_position ON events (job_id, position);
CREATE INDEX IF NOT EXISTS events_actor_position ON events (actor, position);
CREATE INDEX IF NOT EXISTS events_type_position ON events (type, position);


-- Every read by a token with the auditor role, written before anything is served (no record, no
-- read) and finished once when the answer is complete: how many events it served (row_count),
-- its status, and whether it ran to the end (a client may hang up in the middle of a stream).
CREATE TABLE audit_reads (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    read_at     timestamptz NOT NULL DEFAULT now(),
    auditor     text        NOT NULL,
    roles       text[]      NOT NULL,
    method      text        NOT NULL,
    endpoint    text        NOT NULL,
    path        text        NOT NULL,
    filters     jsonb       NOT NULL,
    row_count   bigint,
    status      integer,
    completed   boolean,
    finished_at timestamptz
);

COMMENT ON TABLE audit_reads IS 'Reads by auditors; see schemas/migrations/0004.';
COMMENT ON COLUMN audit_reads.auditor IS 'The token''s subject';
COMMENT ON COLUMN audit_reads.endpoint IS 'The route, as a template (/projects/{project_id}/...)';
COMMENT ON COLUMN audit_reads.filters IS 'The query parameters: name -> list of values as given';
COMMENT ON COLUMN audit_reads.row_count IS 'Events served, for routes that count them; else null';
COMMENT ON COLUMN audit_reads.completed IS 'false: the answer was cut short (error, hang-up)';

CREATE INDEX audit_reads_auditor_read_at ON audit_reads (auditor, read_at);
CREATE INDEX audit_reads_read_at ON audit_reads (read_at);


-- A record is finished exactly once (row_count, status, completed, finished_at) and then never
-- changes; records are never deleted. Pruning old records is a superuser's job, as for events.
CREATE FUNCTION audit_reads_finish_once() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.finished_at IS NOT NULL OR NEW.finished_at IS NULL
       OR (NEW.id, NEW.read_at, NEW.auditor, NEW.roles, NEW.method, NEW.endpoint, NEW.path,
           NEW.filters)
          IS DISTINCT FROM
          (OLD.id, OLD.read_at, OLD.auditor, OLD.roles, OLD.method, OLD.endpoint, OLD.path,
           OLD.filters) THEN
        RAISE EXCEPTION 'audit record % is finished once and never changed', OLD.id
            USING ERRCODE = 'EL005';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER audit_reads_finish_once BEFORE UPDATE ON audit_reads
    FOR EACH ROW EXECUTE FUNCTION audit_reads_finish_once();

CREATE FUNCTION audit_reads_refuse_removal() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are kept: % refused', TG_OP USING ERRCODE = 'EL005';
END
$$;

CREATE TRIGGER audit_reads_no_delete BEFORE DELETE ON audit_reads
    FOR EACH STATEMENT EXECUTE FUNCTION audit_reads_refuse_removal();
CREATE TRIGGER audit_reads_no_truncate BEFORE TRUNCATE ON audit_reads
    FOR EACH STATEMENT EXECUTE FUNCTION audit_reads_refuse_removal();
REVOKE DELETE, TRUNCATE ON audit_reads FROM PUBLIC;
