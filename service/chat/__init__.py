"""Chat apps: people ask for a video from inside Slack or Discord."""
