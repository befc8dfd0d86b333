-- 0008: the row trigger that chains rows written without a hash finds their predecessor by key.
--
-- 0007 fixed this plan trap in events_verify_inserted; the row trigger of 0001 had it too. It
-- looked up "seq = NEW.seq - 1", and a session whose plan was made while events had no
-- statistics (a new deployment) walked the (job_id, position) index and filtered on seq,
-- reading every event of the job for each row: measured with plain INSERTs one at a time into
-- one job of a new database, 1.2 ms of a 2.1 ms insert at 6,000 events, and 4.3 ms an insert at
-- 20,000. The predecessor is now "the job's latest event before this seq", which only the
-- (job_id, seq) key answers in order, in a function planned without sequential scans, as in
-- 0007. Only writers that leave the chain to the database take this path (psql, a tool of
-- their own); the event log's writer brings the hashes and the trigger is not called for it.

CREATE OR REPLACE FUNCTION events_check_and_chain() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off
    AS $$
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
         WHERE e.job_id = NEW.job_id AND e.seq < NEW.seq
         ORDER BY e.seq DESC
         LIMIT 1;
        IF NOT FOUND OR prev.seq <> NEW.seq - 1 THEN
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
