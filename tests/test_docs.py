"""``/docs`` and ``/openapi.json``: served offline, and good enough to try the API from."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from flask.testing import FlaskClient
from openapi_spec_validator import validate

from schemas.jobs import SAMPLE_IMAGE_URL, JobCreateSchema
from service.devstack import ROOT
from service.extension import Services

REQUEST_SCHEMAS = (
    "JobCreate",
    "SubscriptionCreate",
    "SubscriptionUpdate",
    "Recover",
    "ProjectCreate",
    "TokenCreate",
)


def spec(client: FlaskClient) -> dict[str, Any]:
    document: dict[str, Any] = client.get("/openapi.json").json
    return document


def test_the_document_is_valid_openapi(client: FlaskClient) -> None:
    validate(spec(client))  # raises, naming the part that is not


def test_docs_page_loads_nothing_from_another_origin(client: FlaskClient) -> None:
    page = client.get("/docs").get_data(as_text=True)
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources, page
    assert all(source.startswith("/docs/assets/") for source in sources), sources
    for source in sources:
        asset = client.get(source)
        assert asset.status_code == 200, source
        assert len(asset.data) > 1000


def test_docs_assets_refuse_paths_outside_the_package(client: FlaskClient) -> None:
    assert client.get("/docs/assets/../../flask_swagger_ui.py").status_code == 404


def test_bearer_scheme_says_where_the_token_comes_from(client: FlaskClient) -> None:
    description = spec(client)["components"]["securitySchemes"]["bearer"]["description"]
    assert "instance/api_token" in description
    assert "MOTIONHOOK_API_TOKENS" in description


def test_job_submission_declares_idempotency_key(client: FlaskClient) -> None:
    parameters = spec(client)["paths"]["/v1/jobs"]["post"]["parameters"]
    assert {"in": "header", "name": "Idempotency-Key"}.items() <= parameters[0].items()


def test_multipart_form_lists_every_field_it_accepts(client: FlaskClient) -> None:
    document = spec(client)
    form = document["components"]["schemas"]["JobCreateForm"]
    accepted = set(JobCreateSchema().fields) - {"init_image"} | {"image"}
    assert set(form["properties"]) == accepted
    assert form["properties"]["image"]["format"] == "binary"


def test_every_request_field_has_a_description_and_an_example(client: FlaskClient) -> None:
    schemas = spec(client)["components"]["schemas"]
    for name in REQUEST_SCHEMAS:
        for field, prop in schemas[name]["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"
            assert "example" in prop, f"{name}.{field} has no example"


def test_every_response_field_is_described_with_an_example(client: FlaskClient) -> None:
    # Nested objects and lists of them are exemplified by their own fields; a file has none.
    for name, schema in spec(client)["components"]["schemas"].items():
        for field, prop in schema.get("properties", {}).items():
            where = f"{name}.{field}"
            assert prop.get("description"), f"{where} has no description"
            composite = {"allOf", "anyOf"} & prop.keys() or "$ref" in prop.get("items", {})
            if not composite and prop.get("format") != "binary":
                assert "example" in prop, f"{where} has no example"


def test_the_error_example_is_a_real_error(client: FlaskClient, auth: dict[str, str]) -> None:
    error = spec(client)["components"]["schemas"]["Error"]["properties"]
    body = {"init_image": SAMPLE_IMAGE_URL, "num_frames": 99}
    answer = client.post("/v1/jobs", json=body, headers=auth).json
    assert answer == {name: prop["example"] for name, prop in error.items()}


def test_every_parameter_is_described(client: FlaskClient) -> None:
    for path, operations in spec(client)["paths"].items():
        for method, operation in operations.items():
            # "parameters" itself: the path's ids, shared by its operations.
            parameters = operation if method == "parameters" else operation.get("parameters", [])
            for parameter in parameters:
                where = f"{method.upper()} {path} {parameter['name']}"
                assert parameter.get("description"), f"{where} has no description"


def test_the_example_job_is_accepted_as_pasted(client: FlaskClient, auth: dict[str, str]) -> None:
    body = spec(client)["paths"]["/v1/jobs"]["post"]["requestBody"]
    example = body["content"]["application/json"]["example"]
    response = client.post("/v1/jobs", json=example, headers=auth)
    assert response.status_code == 202, response.json


def test_readme_json_examples_are_accepted_as_pasted(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    # As under `make run`, where loopback webhook receivers are allowed.
    services.settings = replace(services.settings, allow_private_targets=True)
    readme = (ROOT / "README.md").read_text()
    bodies = re.findall(
        r"-X POST http://127\.0\.0\.1:8000/v1/jobs(?:(?!\$ ).)*?-d '(\{.*?\})'", readme, re.S
    )
    assert len(bodies) >= 2
    for body in bodies:
        response = client.post("/v1/jobs", data=body, content_type="application/json", headers=auth)
        assert response.status_code == 202, (body, response.json)
