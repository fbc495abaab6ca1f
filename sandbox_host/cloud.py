"""E2B features that exist only in E2B's cloud: the local host answers them 501, naming the feature.

Template builds (the host runs one built-in template), volumes, secrets, metrics and the platform's
sandbox logs have no local counterpart. The SDK turns the answer into a SandboxException carrying this message.
"""

from __future__ import annotations

import re

# (path pattern, feature) in the order they are tried; paths are the SDK's (e2b/api/client/api).
CLOUD_ONLY = (
    (re.compile(r"^/(v\d+/)?templates(/|$)"), "template builds"),
    (re.compile(r"^/default-templates(/|$)"), "template builds"),
    (re.compile(r"^/volumes(/|$)"), "volumes"),
    (re.compile(r"^/secrets(/|$)"), "secrets"),
    (re.compile(r"^/sandboxes/metrics$"), "sandbox metrics"),
    (re.compile(r"^/sandboxes/[^/]+/metrics$"), "sandbox metrics"),
    (re.compile(r"^(/v2)?/sandboxes/[^/]+/logs$"), "sandbox logs"),
)


def cloud_only_feature(path: str) -> str | None:
    return next((feature for pattern, feature in CLOUD_ONLY if pattern.match(path)), None)


def cloud_only_message(feature: str) -> str:
    return f"{feature} are an E2B cloud feature: the local sandbox host does not implement them"
