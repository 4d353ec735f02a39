"""Projects and their tokens, as admins see them."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, missing, validate

SCOPES = ("read", "write", "admin")
TOKEN_DESCRIPTION_DOC = {"description": "Your note: who or what uses it", "example": "CI deploys"}
PROJECT_NAME = validate.Regexp(
    r"^[a-z0-9][a-z0-9_-]{0,63}\Z",
    error="must be 1 to 64 lower-case letters, digits, '-' or '_', starting with a letter or digit",
)

# The value is never echoed in an error: it is a credential.
MODELSLAB_API_KEY = validate.Regexp(
    r"^[\x21-\x7e]{8,256}\Z", error="must be 8 to 256 printable characters without spaces"
)
MODELSLAB_API_KEY_HELP = (
    "The project's own ModelsLab API key: its jobs are submitted and fetched with it and "
    "count against that account's queued-request cap. Shown back only masked; null: the "
    "instance's key (MOTIONHOOK_MODELSLAB_API_KEY) and its cap, shared with the other "
    "projects without a key."
)


def modelslab_api_key_field(*, required: bool) -> fields.String:
    """The key as a project's create (optional, default null) or update (required) takes it."""
    return fields.String(
        required=required,
        load_default=missing if required else None,
        allow_none=True,
        validate=MODELSLAB_API_KEY,
        metadata={
            "description": MODELSLAB_API_KEY_HELP,
            "example": "sk-acme-0123456789abcdef",
            # The same rule for the docs' (JavaScript) regex engine, which has no \Z.
            "pattern": "^[\\x21-\\x7e]{8,256}$",
        },
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
    modelslab_api_key = modelslab_api_key_field(required=False)


class ProjectUpdateSchema(Schema):
    class Meta:
        unknown = RAISE

    modelslab_api_key = modelslab_api_key_field(required=True)


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
    modelslab_api_key = fields.String(
        metadata={
            "description": "The project's own ModelsLab key, masked: *** and its "
            "last 4 characters (*** alone for a key under 16); absent when the project "
            "uses the instance's key",
            "example": "***9f2c",
        },
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
