"""Projects and their tokens, as admins see them."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, missing, validate

SCOPES = ("read", "write", "admin")
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
        metadata={"description": MODELSLAB_API_KEY_HELP},
    )


class ProjectCreateSchema(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(required=True, validate=PROJECT_NAME)
    modelslab_api_key = modelslab_api_key_field(required=False)


class ProjectUpdateSchema(Schema):
    class Meta:
        unknown = RAISE

    modelslab_api_key = modelslab_api_key_field(required=True)


class ProjectSchema(Schema):
    id = fields.String()
    name = fields.String()
    created_at = fields.String()
    webhook_secret = fields.String(
        metadata={"description": "Signs per-job webhooks; only on create and rotate"}
    )
    modelslab_api_key = fields.String(
        metadata={
            "description": "The project's own ModelsLab key, masked: *** and its "
            "last 4 characters (*** alone for a key under 16); absent when the project "
            "uses the instance's key"
        },
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
