"""FedBPT site script, run by NVFlare's ClientAPIExecutor in its own process for the whole job.

It only moves messages: receive the global search distribution, let the site evaluate it and search
locally from it, send the local result back. All model and search work lives in the fedbpt package.
A site that cannot take part (a bad flag, missing data, settings that do not fit the server's state)
answers every task with the reason instead of a result, so that the server's log and metrics say why; a
round that fails for any other reason is answered the same way, with the exception's type and place, and
the site tries again in the next round.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import nvflare.client as flare
from nvflare.client.tracking import SummaryWriter

from fedbpt.client import FedBPTClient, check_server_state
from fedbpt.config import parse_args
from fedbpt.search import GlobalPrompt, decode_down, encode_up

TRACKED = ("dev_loss", "dev_acc", "test_loss", "test_acc", "local_fitness", "local_sigma")
log = logging.getLogger("fedbpt")


def describe(e: BaseException) -> str:
    """An exception for the server's log and metrics: its message, its type and where it was raised."""
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    place = f" at {'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno} in {frame.name}" if frame else ""
    return f"{str(e).strip() or '(no message)'} ({type(e).__name__}{place})"


def join(site: str, start: GlobalPrompt) -> tuple[FedBPTClient | None, str | None]:
    """The site, or why it cannot take part: its flags are checked against the server's first message
    before the model loads, so that a mismatch is reported within seconds. Any exception counts: a site
    that cannot be built says so to the server instead of ending its process."""
    try:
        cfg = parse_args()
        check_server_state(cfg, start)
        return FedBPTClient(cfg, site), None
    except Exception as e:
        error = f"{site} cannot take part: {describe(e)}"
        log.error(error, exc_info=not isinstance(e, (ValueError, FileNotFoundError)))  # a bad flag needs no trace
        return None, error


def run_round(site: str, client: FedBPTClient, start: GlobalPrompt) -> tuple[tuple | None, str | None, bool]:
    """(result and metrics, or why not, whether the site must stop). A prompt the site cannot score in its
    dtype (``FloatingPointError``) stops it: every later round searches around that prompt. Any other
    exception is reported for this round only; the site tries again in the next one."""
    try:
        return client.run_round(start), None, False
    except Exception as e:
        fatal = isinstance(e, FloatingPointError)
        error = f"{site} {'cannot take part' if fatal else f'failed in round {start.round}'}: {describe(e)}"
        log.error(error, exc_info=not fatal)
        return None, error, fatal


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    flare.init()
    site = flare.get_site_name()
    writer = SummaryWriter()
    client, error = None, None

    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        start = decode_down(received.params, received.meta)
        if client is None and error is None:
            client, error = join(site, start)
        failure = error
        if error is None:
            done, failure, fatal = run_round(site, client, start)
            error = failure if fatal else None
        if failure:
            flare.send(flare.FLModel(params={}, meta={"error": failure, "stopped": error is not None}))
            continue
        result, metrics = done
        for key in TRACKED:
            if key in metrics:
                writer.add_scalar(key, metrics[key], global_step=start.round)
        params, meta = encode_up(result)
        meta["fingerprint"] = client.blackbox.fingerprint
        # (about 470 bytes as JSON) until the server's broadcast shows it holds this very description
        description = client.description()
        if not start.knows(site, description):
            meta["description"] = description
        flare.send(flare.FLModel(params=params, metrics=metrics, meta=meta))


if __name__ == "__main__":
    main()
