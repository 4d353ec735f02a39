"""Projects and their tokens, as admins see them."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

SCOPES = ("read", "write", "admin")
TOKEN_DESCRIPTION_DOC = {"description": "Your note: who or what uses it", "example": "CI deploys"}
PROJECT_NAME = validate.Regexp(
    r"^[a-z0-9][a-z0-9_-]{0,63}\Z",
    error="must be 1 to 64 lower-case letters, digits, '-' or '_', starting with a letter or digit",
)


class ProjectCreateSchema(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(
        required=True,
        validate=PROJECT_NAME,
        metadata={
            "description": "1 to 64 lower-case letters, digits, '-' or '_'; unique",
            "example": "acme",
            # The same rule for the docs' (JavaScript) regex engine, which has no \Z.
            "pattern": "^[a-z0-9][a-z0-9_-]{0,63}$",
        },
    )


class ProjectSchema(Schema):
    id = fields.String(
        metadata={"description": "The project id", "example": "prj_6cwvt3km4fmcqadovsu7p2wq"}
    )
    name = fields.String(metadata={"description": "Its unique name", "example": "acme"})
    created_at = fields.String(
        metadata={"description": "RFC 3339", "example": "2026-01-01T12:00:00Z"}
    )
    webhook_secret = fields.String(
        metadata={
            "description": "Signs per-job webhooks; only on create and rotate",
            "example": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        }
    )


class ProjectListSchema(Schema):
    items = fields.List(fields.Nested(ProjectSchema), metadata={"description": "Every project"})


class TokenCreateSchema(Schema):
    class Meta:
        unknown = RAISE

    scope = fields.String(
        required=True,
        validate=validate.OneOf(SCOPES, error="must be one of: " + ", ".join(SCOPES)),
        metadata={
            "description": "read: GET only; write: everything in the project; admin: the admin API",
            "example": "write",
        },
    )
    description = fields.String(
        load_default="",
        validate=validate.Length(max=500),
        metadata=TOKEN_DESCRIPTION_DOC,
    )


class TokenSchema(Schema):
    id = fields.String(
        metadata={"description": "The token's id", "example": "tok_qkzkvsczbxddtpwzl6biql43"}
    )
    scope = fields.String(
        metadata={"description": "What it may do", "enum": list(SCOPES), "example": "write"}
    )
    description = fields.String(metadata=TOKEN_DESCRIPTION_DOC)
    created_at = fields.String(
        metadata={"description": "RFC 3339", "example": "2026-01-01T12:00:00Z"}
    )
    token = fields.String(
        metadata={
            "description": "Only on create; it is stored hashed",
            "example": "mh_Xq3v8KpL2mN7rT1wY6zB4cF9",
        }
    )


class TokenListSchema(Schema):
    items = fields.List(
        fields.Nested(TokenSchema), metadata={"description": "The project's tokens"}
    )
