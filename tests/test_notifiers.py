"""Channel formats: signed webhooks, Slack Block Kit and Discord embeds, within every limit."""

from __future__ import annotations

import base64
import json
import random
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import standardwebhooks
import svix.webhooks

from service.notifiers import (
    ELLIPSIS,
    Message,
    discord,
    fit,
    render_message,
    slack,
    text_length,
    webhook,
)
from service.notifiers.webhook import generate_secret

LONG_EMOJI_PROMPT = ("A red fox 🦊 jumps & <runs> past 👨‍👩‍👧 at dusk 🇫🇷 " * 300)[:10_000]


def job(**changes: Any) -> dict[str, Any]:
    """Return a completed job resource, with ``changes`` applied."""
    resource: dict[str, Any] = {
        "id": "job_k3jx5",
        "status": "completed",
        "model_id": "wan2.2",
        "input": {"init_image": "https://example.com/cat.png", "prompt": "A cat surfing"},
        "metadata": {"order": 7},
        "created_at": "2025-05-01T10:00:00Z",
        "updated_at": "2025-05-01T10:02:00Z",
        "completed_at": "2025-05-01T10:02:00Z",
        "upstream": {"id": "146", "status": "success", "eta": None},
        "outputs": [
            {
                "url": "https://media.example/v/job_k3jx5.mp4?exp=1&sig=abc",
                "source_url": "https://pub.modelslab.com/146.mp4",
                "content_type": "video/mp4",
                "bytes": 123,
                "sha256": "00" * 32,
                "stored": True,
            }
        ],
        "error": None,
    }
    resource.update(changes)
    return resource


def failed_job(**changes: Any) -> dict[str, Any]:
    return job(
        status="failed",
        outputs=[],
        completed_at="2025-05-01T10:02:00Z",
        error={"code": "upstream_error", "message": "GPU <out> of memory & more"},
        **changes,
    )


def envelope(
    event_type: str = "job.completed", data: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "id": "evt_2b7q",
        "type": event_type,
        "created_at": "2025-05-01T10:02:01Z",
        "data": job() if data is None else data,
    }


def ping() -> dict[str, Any]:
    return envelope("test.ping", {"subscription_id": "sub_9x", "message": "Hello <@here> & co"})


def with_prompt(prompt: str, **changes: Any) -> dict[str, Any]:
    base = failed_job if changes.pop("failed", False) else job
    return base(input={"init_image": "https://example.com/a.png", "prompt": prompt}, **changes)


# --- webhook (Standard Webhooks) --------------------------------------------------------


def test_webhook_signature_verifies_with_standardwebhooks() -> None:
    secret = generate_secret()
    message = webhook.render(envelope(), [secret])

    payload = standardwebhooks.Webhook(secret).verify(message.body, message.headers)

    assert payload == envelope()


def test_webhook_signature_verifies_with_svix() -> None:
    secret = generate_secret()
    message = webhook.render(envelope(), [secret])

    svix.webhooks.Webhook(secret).verify(message.body, message.headers)


def test_webhook_signed_with_two_secrets_verifies_with_each() -> None:
    old, new = generate_secret(), generate_secret()
    message = webhook.render(envelope(), [new, old])

    assert len(message.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        standardwebhooks.Webhook(secret).verify(message.body, message.headers)
        svix.webhooks.Webhook(secret).verify(message.body, message.headers)


def test_webhook_signature_fails_with_another_secret() -> None:
    message = webhook.render(envelope(), [generate_secret()])

    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(generate_secret()).verify(message.body, message.headers)


def test_webhook_signature_fails_when_body_changes() -> None:
    secret = generate_secret()
    message = webhook.render(envelope(), [secret])
    tampered = message.body.replace(b"wan2.2", b"ltx-2.3")

    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(tampered, message.headers)


def test_webhook_headers_and_compact_body() -> None:
    sent_at = datetime(2025, 5, 1, 12, 0, 30, 900_000, tzinfo=timezone(timedelta(hours=2)))

    message = webhook.render(envelope(), [generate_secret()], sent_at)

    assert message.headers["content-type"] == "application/json"
    assert message.headers["webhook-id"] == "evt_2b7q"
    assert message.headers["webhook-timestamp"] == str(int(sent_at.timestamp()))
    assert message.body == json.dumps(envelope(), separators=(",", ":")).encode()


def test_webhook_body_with_lone_surrogate_is_still_valid_and_signed() -> None:
    secret = generate_secret()
    event = envelope(data=with_prompt("broken \ud83d emoji ☕"))

    message = webhook.render(event, [secret])

    message.body.decode("utf-8")
    assert standardwebhooks.Webhook(secret).verify(message.body, message.headers) == event


def test_webhook_requires_a_secret_and_an_event_id() -> None:
    with pytest.raises(ValueError, match="secret"):
        webhook.render(envelope(), [])
    with pytest.raises(ValueError, match="id"):
        webhook.render({"type": "test.ping", "data": {}}, [generate_secret()])


def test_generate_secret_is_whsec_base64_of_random_bytes() -> None:
    first, second = generate_secret(), generate_secret()

    assert first.startswith("whsec_")
    assert 24 <= len(base64.b64decode(first.removeprefix("whsec_"))) <= 32
    assert first != second


def test_render_message_dispatches_by_kind() -> None:
    secret = generate_secret()
    now = datetime.now(UTC)

    signed = render_message("webhook", envelope(), secrets=[secret], timestamp=now)
    chat = render_message("slack", envelope(), secrets=[secret])
    embed = render_message("discord", envelope(), secrets=[])

    assert isinstance(signed, Message)
    assert "webhook-signature" in signed.headers
    assert json.loads(chat.body)["blocks"]
    assert json.loads(embed.body)["embeds"]
    assert chat.headers == {"content-type": "application/json"}
    with pytest.raises(ValueError, match="unknown subscription kind"):
        render_message("teams", envelope(), secrets=[])


# --- Slack ------------------------------------------------------------------------------


def blocks_of(payload: dict[str, Any], block_type: str) -> list[dict[str, Any]]:
    return [block for block in payload["blocks"] if block["type"] == block_type]


def slack_texts(payload: dict[str, Any]) -> list[tuple[str, str, int]]:
    """Return (where, text, limit) for every text object in a Slack payload."""
    found = [("text", payload["text"], 40_000)]
    for block in payload["blocks"]:
        if block["type"] == "header":
            found.append(("header", block["text"]["text"], slack.HEADER_LIMIT))
        if "text" in block and block["type"] == "section":
            found.append(("section", block["text"]["text"], slack.SECTION_TEXT_LIMIT))
        for field in block.get("fields", []):
            found.append(("field", field["text"], slack.FIELD_TEXT_LIMIT))
        for element in block.get("elements", []):
            if element.get("type") == "button":
                found.append(("button", element["text"]["text"], slack.BUTTON_TEXT_LIMIT))
                found.append(("url", element["url"], slack.BUTTON_URL_LIMIT))
            elif "text" in element:
                found.append(("context", element["text"], 2000))
    return found


def test_slack_completed_job_has_fallback_text_blocks_and_video_button() -> None:
    payload = slack.render(envelope())

    assert payload["text"] == "Video ready: A cat surfing"
    assert blocks_of(payload, "header")[0]["text"]["text"].endswith("Video ready")
    rendered = json.dumps(payload)
    assert "A cat surfing" in rendered
    assert "wan2.2" in rendered
    assert "job_k3jx5" in rendered
    (button,) = blocks_of(payload, "actions")[0]["elements"]
    assert button["type"] == "button"
    assert button["url"] == "https://media.example/v/job_k3jx5.mp4?exp=1&sig=abc"


def test_slack_button_falls_back_to_the_upstream_url() -> None:
    data = job(outputs=[{"url": None, "source_url": "https://pub.modelslab.com/146.mp4"}])

    payload = slack.render(envelope(data=data))

    (button,) = blocks_of(payload, "actions")[0]["elements"]
    assert button["url"] == "https://pub.modelslab.com/146.mp4"


def test_slack_failed_job_shows_the_error_and_no_button() -> None:
    payload = slack.render(envelope("job.failed", failed_job()))

    assert payload["text"] == "Video failed: GPU &lt;out&gt; of memory &amp; more"
    sections = " ".join(block.get("text", {}).get("text", "") for block in payload["blocks"])
    assert "`upstream_error`" in sections
    assert "GPU &lt;out&gt; of memory &amp; more" in sections
    assert blocks_of(payload, "actions") == []


def test_slack_processing_job_has_no_button() -> None:
    data = job(status="processing", outputs=[], completed_at=None)

    payload = slack.render(envelope("job.processing", data))

    assert payload["text"] == "Video processing: A cat surfing"
    assert blocks_of(payload, "actions") == []


def test_slack_escapes_mrkdwn_control_characters() -> None:
    prompt = "<!channel> & <https://evil.example|click me> 1 > 0"

    payload = slack.render(envelope(data=with_prompt(prompt)))

    escaped = "&lt;!channel&gt; &amp; &lt;https://evil.example|click me&gt; 1 &gt; 0"
    assert payload["text"] == f"Video ready: {escaped}"
    assert blocks_of(payload, "section")[0]["text"]["text"] == escaped
    assert "<!channel>" not in json.dumps(payload)


def test_slack_long_emoji_prompt_stays_within_every_limit() -> None:
    for event in (
        envelope(data=with_prompt(LONG_EMOJI_PROMPT)),
        envelope("job.failed", with_prompt(LONG_EMOJI_PROMPT, failed=True)),
    ):
        payload = slack.render(event)

        json.dumps(payload, ensure_ascii=False).encode("utf-8")
        for where, text, limit in slack_texts(payload):
            assert 0 < text_length(text) <= limit, where
        prompt_text = blocks_of(payload, "section")[0]["text"]["text"]
        assert prompt_text.endswith(ELLIPSIS)
        assert text_length(prompt_text) > slack.SECTION_TEXT_LIMIT - 10


def test_slack_truncation_never_splits_an_escape() -> None:
    payload = slack.render(envelope(data=with_prompt("&" * 5000)))

    text = blocks_of(payload, "section")[0]["text"]["text"]
    assert re.fullmatch(r"(&amp;)+…", text)
    assert len(text) <= slack.SECTION_TEXT_LIMIT


def test_slack_omits_a_button_whose_url_is_too_long() -> None:
    long_url = "https://media.example/" + "a" * 3000
    data = job(outputs=[{"url": long_url, "source_url": None}])

    payload = slack.render(envelope(data=data))

    assert blocks_of(payload, "actions") == []


def test_slack_ping_is_a_simple_message() -> None:
    payload = slack.render(ping())

    assert payload["text"] == "motionhook test: Hello &lt;@here&gt; &amp; co"
    assert [block["type"] for block in payload["blocks"]] == ["section", "context"]


# --- Discord ----------------------------------------------------------------------------


def embed_total(embed: dict[str, Any]) -> int:
    parts = [embed.get("title", ""), embed.get("description", ""), embed["footer"]["text"]]
    for field in embed.get("fields", []):
        parts += [field["name"], field["value"]]
    return sum(text_length(part) for part in parts)


def assert_within_discord_limits(payload: dict[str, Any]) -> None:
    json.dumps(payload, ensure_ascii=False).encode("utf-8")
    assert text_length(payload["content"]) <= discord.CONTENT_LIMIT
    (embed,) = payload["embeds"]
    assert text_length(embed["title"]) <= discord.TITLE_LIMIT
    assert text_length(embed.get("description", "")) <= discord.DESCRIPTION_LIMIT
    assert text_length(embed["footer"]["text"]) <= discord.FOOTER_LIMIT
    assert len(embed.get("fields", [])) <= 25
    for field in embed.get("fields", []):
        assert 0 < text_length(field["name"]) <= discord.FIELD_NAME_LIMIT
        assert 0 < text_length(field["value"]) <= discord.FIELD_VALUE_LIMIT
    assert embed_total(embed) <= discord.EMBED_TOTAL_LIMIT


def test_discord_completed_job_puts_the_video_url_in_content() -> None:
    payload = discord.render(envelope())

    url = "https://media.example/v/job_k3jx5.mp4?exp=1&sig=abc"
    assert payload["content"] == url
    (embed,) = payload["embeds"]
    assert embed["color"] == discord.GREEN
    assert embed["description"] == "A cat surfing"
    assert embed["url"] == url
    assert embed["timestamp"] == "2025-05-01T10:02:00Z"
    names = {field["name"]: field["value"] for field in embed["fields"]}
    assert names["Model"] == "wan2.2"
    assert names["Job"] == "job\\_k3jx5"
    assert names["Status"] == "completed"


def test_discord_never_allows_mentions() -> None:
    for event in (envelope(data=with_prompt("@everyone look")), ping()):
        assert discord.render(event)["allowed_mentions"] == {"parse": []}


def test_discord_failed_job_shows_the_error() -> None:
    payload = discord.render(envelope("job.failed", failed_job()))

    (embed,) = payload["embeds"]
    assert payload["content"] == "Video failed"
    assert embed["color"] == discord.RED
    error = next(field for field in embed["fields"] if field["name"] == "Error")
    assert error["value"] == "upstream\\_error: GPU \\<out\\> of memory & more"


def test_discord_escapes_markdown_in_prompts() -> None:
    payload = discord.render(
        envelope(data=with_prompt("[free nitro](https://evil.example) **now**"))
    )

    description = payload["embeds"][0]["description"]
    assert description == "\\[free nitro\\]\\(https://evil.example\\) \\*\\*now\\*\\*"


def test_discord_long_emoji_prompt_stays_within_every_limit() -> None:
    for event in (
        envelope(data=with_prompt(LONG_EMOJI_PROMPT)),
        envelope("job.failed", with_prompt(LONG_EMOJI_PROMPT, failed=True)),
        envelope("test.ping", {"subscription_id": "sub_1", "message": LONG_EMOJI_PROMPT}),
    ):
        payload = discord.render(event)

        assert_within_discord_limits(payload)
        assert payload["embeds"][0]["description"].endswith(ELLIPSIS)


def test_discord_shrinks_the_description_to_respect_the_embed_total() -> None:
    huge_error = {"code": "upstream_error", "message": "x" * 5000}
    data = with_prompt("p" * 10_000, failed=True)
    data["error"] = huge_error
    data["id"] = "j" * 300

    payload = discord.render(envelope("job.failed", data))

    assert_within_discord_limits(payload)


def test_discord_long_video_url_is_not_put_in_content() -> None:
    long_url = "https://media.example/" + "a" * 2100
    data = job(outputs=[{"url": long_url, "source_url": None}])

    payload = discord.render(envelope(data=data))

    assert payload["content"] == "Video ready"
    assert_within_discord_limits(payload)


def test_discord_ping() -> None:
    payload = discord.render(ping())

    assert payload["content"] == "motionhook test notification"
    (embed,) = payload["embeds"]
    assert embed["color"] == discord.BLUE
    assert embed["description"] == "Hello \\<@here\\> & co"


# --- text fitting -----------------------------------------------------------------------


def test_fit_keeps_short_text_and_cuts_long_text_with_an_ellipsis() -> None:
    assert fit("hello", 5) == "hello"
    assert fit("hello world", 8) == "hello w…"


def test_fit_counts_astral_characters_as_two_units() -> None:
    text = fit("😀" * 10, 9)

    assert text == "😀" * 4 + ELLIPSIS
    assert text_length(text) == 9


def test_fit_does_not_split_emoji_sequences_or_flags() -> None:
    family = "👨\u200d👩\u200d👧"

    assert fit(family * 3, 12) == family + ELLIPSIS
    assert fit("🇫🇷🇩🇪", 7) == "🇫🇷" + ELLIPSIS


def test_fit_replaces_lone_surrogates() -> None:
    assert fit("a\ud83db", 10) == "a\ufffdb"


def test_fit_never_exceeds_the_limit_for_random_text() -> None:
    rng = random.Random(7)
    alphabet = ["a", " ", "&", "<", "é", "\u0301", "😀", "\u200d", "🇫", "\ufe0f", "\ud800", "*"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        limit = rng.randint(2, 60)
        for escape in (None, slack.escape_char, discord.escape_char):
            result = fit(text, limit, escape=escape)
            assert text_length(result) <= limit
            result.encode("utf-8")
