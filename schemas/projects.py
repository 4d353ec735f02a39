"""Projects and their tokens, as admins see them."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

SCOPES = ("read", "write", "admin")
PROJECT_NAME = validate.Regexp(
    r"^[a-z0-9][a-z0-9_-]{0,63}\Z",
    error="must be 1 to 64 lower-case letters, digits, '-' or '_', starting with a letter or digit",
)


class ProjectCreateSchema(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(required=True, validate=PROJECT_NAME)


class ProjectSchema(Schema):
    id = fields.String()
    name = fields.String()
    created_at = fields.String()
    webhook_secret = fields.String(
        metadata={"description": "Signs per-job webhooks; only on create and rotate"}
    )


class ProjectListSchema(Schema):
    items = fields.List(fields.Nested(ProjectSchema))


class TokenCreateSchema(Schema):
    class Meta:
        unknown = RAISE

    scope = fields.String(
        required=True,
        validate=validate.OneOf(SCOPES, error="must be one of: " + ", ".join(SCOPES)),
    )
    description = fields.String(load_default="", validate=validate.Length(max=500))


class TokenSchema(Schema):
    id = fields.String()
    scope = fields.String(metadata={"enum": list(SCOPES)})
    description = fields.String()
    created_at = fields.String()
    token = fields.String(metadata={"description": "Only on create; it is stored hashed"})


class TokenListSchema(Schema):
    items = fields.List(fields.Nested(TokenSchema))
