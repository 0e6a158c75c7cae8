"""FedBPT site script, run by NVFlare's ClientAPIExecutor in its own process for the whole job.

It only moves messages: receive the global search distribution, let the site evaluate it and search
locally from it, send the local result back. All model and search work lives in the fedbpt package.
A site that cannot take part (a bad flag, missing data, settings that do not fit the server's state)
answers every task with the reason instead of a result, so that the server's log and metrics say why.
"""

from __future__ import annotations

import logging

import nvflare.client as flare
from nvflare.client.tracking import SummaryWriter

from fedbpt.client import FedBPTClient, check_server_state
from fedbpt.config import parse_args
from fedbpt.search import GlobalPrompt, decode_down, encode_up

TRACKED = ("dev_loss", "dev_acc", "test_loss", "test_acc", "local_fitness", "local_sigma")
log = logging.getLogger("fedbpt")


def join(site: str, start: GlobalPrompt) -> tuple[FedBPTClient | None, str | None]:
    """The site, or why it cannot take part: its flags are checked against the server's first message
    before the model loads, so that a mismatch is reported within seconds."""
    try:
        cfg = parse_args()
        check_server_state(cfg, start)
        return FedBPTClient(cfg, site), None
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        log.error("%s cannot take part: %s", site, e)
        return None, f"{site} cannot take part: {e}"


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
        if error is None:
            try:
                result, metrics = client.run_round(start)
            except FloatingPointError as e:  # float16 overflow: every later round would overflow again
                error = f"{site} cannot take part: {e}"
                log.error(error)
        if error:
            flare.send(flare.FLModel(params={}, meta={"error": error}))
            continue
        for key in TRACKED:
            if key in metrics:
                writer.add_scalar(key, metrics[key], global_step=start.round)
        params, meta = encode_up(result)
        meta["fingerprint"] = client.blackbox.fingerprint
        # with every result (about 500 bytes): a server that missed or lost an earlier one still checks the site
        # against it and writes the prompt files from it
        meta["description"] = client.description()
        flare.send(flare.FLModel(params=params, metrics=metrics, meta=meta))


if __name__ == "__main__":
    main()
