"""The one error shape every endpoint answers with, as the API docs show it."""

from __future__ import annotations

from marshmallow import Schema, fields


class ErrorSchema(Schema):
    code = fields.Integer(metadata={"description": "The HTTP status", "example": 422})
    status = fields.String(
        metadata={"description": "The HTTP status's name", "example": "Unprocessable Entity"}
    )
    message = fields.String(
        metadata={
            "description": "Every problem, each naming its field",
            "example": "num_frames: Must be greater than or equal to 1 and less than or equal "
            "to 25.",
        }
    )
    errors = fields.Dict(
        metadata={
            "description": "The same problems by field (where the request was checked)",
            "example": {
                "json": {
                    "num_frames": [
                        "Must be greater than or equal to 1 and less than or equal to 25."
                    ]
                }
            },
        }
    )
