-- Durable consumers: a named reader of the log (or of one project's events) that acknowledges
-- the positions it has processed. After a restart it resumes after the last acknowledged one, so
-- delivery is at least once: what was processed but not yet acknowledged comes again.

CREATE TABLE consumers (
    name        text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$'),
    owner_id    text        NOT NULL,
    project_id  text,       -- NULL: the whole log
    position    bigint      NOT NULL DEFAULT 0 CHECK (position >= 0),
    acks        bigint      NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

COMMENT ON COLUMN consumers.position IS
    'Every event of the stream at or below this log position has been processed';
