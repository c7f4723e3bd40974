"""Alerts of the nightly deployment: install deploy/automations.yaml's Prefect automations, idempotently.

``ensure_automations`` resolves the file's placeholders (the notification block's id, the deployment's flow and
deployment names), then creates each automation or updates the one of the same name (extra copies are deleted),
so running it twice leaves one of each. ``python -m flows.alerts --block NAME`` does it against the server at
``PREFECT_API_URL``; ``--render PATH`` writes the resolved automations instead, in the format
``prefect automation create --from-file`` loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import yaml
from prefect.client.orchestration import PrefectClient, get_client
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL
from prefect.utilities.asyncutils import run_coro_as_sync

from catalog_tagger.errors import UserError

logger = logging.getLogger(__name__)

AUTOMATIONS_FILE = Path(__file__).resolve().parents[1] / "deploy" / "automations.yaml"
NIGHTLY_DEPLOYMENT = "nightly-tagging/local"


def _split_deployment(deployment: str) -> tuple[str, str]:
    flow, _, name = deployment.partition("/")
    if not flow or not name or "/" in name:
        raise UserError(f"deployment {deployment!r}: expected FLOW/DEPLOYMENT, e.g. {NIGHTLY_DEPLOYMENT}")
    return flow, name


def _substitute(node: Any, values: dict[str, str]) -> Any:
    """``node`` with every string exactly equal to ``${key}`` replaced by ``values[key]`` (nothing else touched)."""
    if isinstance(node, dict):
        return {k: _substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    if isinstance(node, str) and node.startswith("${") and node.endswith("}"):
        key = node[2:-1]
        if key not in values:
            raise UserError(f"{AUTOMATIONS_FILE.name}: unknown placeholder {node!r} (known: {sorted(values)})")
        return values[key]
    return node


def load_automations(
    block_id: UUID | str, deployment: str = NIGHTLY_DEPLOYMENT, path: Path = AUTOMATIONS_FILE
) -> list[AutomationCore]:
    """The automations of ``path`` for this notification block and deployment, validated by Prefect's schema."""
    flow, name = _split_deployment(deployment)
    data = yaml.safe_load(path.read_text())
    entries = data["automations"] if isinstance(data, dict) else data
    values = {"notify_block": str(block_id), "flow": flow, "deployment": name}
    return [AutomationCore.model_validate(_substitute(entry, values)) for entry in entries]


async def _block_id(client: PrefectClient, block: str) -> UUID:
    """The id of the notification block ``block`` (``name`` or ``block-type-slug/name``); refuses a non-notifier."""
    slug, _, name = block.rpartition("/")
    if slug:
        try:
            docs = [await client.read_block_document_by_name(name, slug)]
        except ObjectNotFound:
            docs = []
    else:
        docs = [d for d in await client.read_block_documents(include_secrets=False) if d.name == name]
    if not docs:
        raise UserError(f"no block named {block!r} on the Prefect server: create a notification block first")
    if len(docs) > 1:
        slugs = sorted(f"{d.block_type.slug}/{name}" for d in docs if d.block_type)
        raise UserError(f"several blocks are named {name!r}: pass one of {slugs}")
    [doc] = docs
    if doc.block_schema is None or "notify" not in doc.block_schema.capabilities:
        raise UserError(f"block {block!r} cannot send notifications (no `notify` capability)")
    assert doc.id is not None
    return doc.id


async def _upsert(client: PrefectClient, automation: AutomationCore) -> UUID:
    """Create ``automation`` or update the first one of its name; delete any further copy of that name."""
    existing = await client.read_automations_by_name(automation.name)
    if not existing:
        automation_id = await client.create_automation(automation)
        logger.info("created automation %r (%s)", automation.name, automation_id)
        return automation_id
    first, *extra = existing
    await client.update_automation(first.id, automation)
    for copy in extra:
        await client.delete_automation(copy.id)
        logger.info("deleted a duplicate automation %r (%s)", copy.name, copy.id)
    logger.info("updated automation %r (%s)", automation.name, first.id)
    return first.id


def _client(deployment: str) -> PrefectClient:
    """A client of the server at PREFECT_API_URL, after the arguments are checked (no temporary server: automations
    installed there would vanish with it)."""
    _split_deployment(deployment)
    if not PREFECT_API_URL.value():
        raise UserError("PREFECT_API_URL is unset: point it at the Prefect server the deployments are on")
    return get_client()


async def aensure_automations(notify_block: str, deployment: str = NIGHTLY_DEPLOYMENT) -> list[str]:
    """Async ``ensure_automations``."""
    async with _client(deployment) as client:
        automations = load_automations(await _block_id(client, notify_block), deployment)
        return [str(await _upsert(client, a)) for a in automations]


def ensure_automations(notify_block: str, deployment: str = NIGHTLY_DEPLOYMENT) -> list[str]:
    """Create or update deploy/automations.yaml's automations on the server; returns their ids, in file order.

    ``notify_block``: the notification block, ``name`` or ``block-type-slug/name``; ``deployment``:
    ``FLOW/DEPLOYMENT`` whose Failed or Crashed runs notify. Idempotent: one automation per name.
    """
    return run_coro_as_sync(aensure_automations(notify_block, deployment))


async def _render(notify_block: str, deployment: str) -> list[dict[str, Any]]:
    async with _client(deployment) as client:
        automations = load_automations(await _block_id(client, notify_block), deployment)
    return [a.model_dump(mode="json") for a in automations]


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.alerts --block NAME [--deployment FLOW/DEPLOYMENT] [--render PATH]``."""
    parser = argparse.ArgumentParser(prog="python -m flows.alerts", description=__doc__.splitlines()[0])
    parser.add_argument("--block", required=True, help="notification block: NAME or BLOCK-TYPE-SLUG/NAME")
    parser.add_argument("--deployment", default=NIGHTLY_DEPLOYMENT, help="FLOW/DEPLOYMENT (default: %(default)s)")
    parser.add_argument("--render", type=Path, help="write the resolved automations (JSON) here; install nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.render:
            rendered = run_coro_as_sync(_render(args.block, args.deployment))
            args.render.write_text(json.dumps({"automations": rendered}, indent=2) + "\n")
            logger.info("wrote %d automations to %s", len(rendered or []), args.render)
        else:
            ids = ensure_automations(args.block, args.deployment)
            logger.info("%d automations installed for %s", len(ids), args.deployment)
    except UserError as exc:
        logger.error("error: %s", exc)
        return 2
    except (httpx.HTTPError, PrefectHTTPStatusError) as exc:
        logger.error("error: the Prefect API at %s: %s", PREFECT_API_URL.value() or "(PREFECT_API_URL unset)", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
