"""The one error shape every motionhook endpoint answers with."""

from marshmallow import Schema, fields


class ErrorSchema(Schema):
    code = fields.Integer(required=True)
    status = fields.String(required=True)
    message = fields.String(required=True)
    errors = fields.Dict()
