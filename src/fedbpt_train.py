"""FedBPT site script, run by NVFlare's ClientAPIExecutor in its own process for the whole job.

It only moves messages: receive the global search distribution, let the site evaluate it and search
locally from it, send the local result back. All model and search work lives in the fedbpt package.
"""

import logging
import sys

import nvflare.client as flare
from nvflare.client.tracking import SummaryWriter

from fedbpt.client import FedBPTClient
from fedbpt.config import parse_args
from fedbpt.search import decode_down, encode_up

TRACKED = ("dev_loss", "dev_acc", "test_loss", "test_acc", "local_fitness", "local_sigma")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        cfg = parse_args()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"fedbpt_train.py: error: {e}")
    flare.init()
    site = flare.get_site_name()
    try:
        client = FedBPTClient(cfg, site)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # The site stops here; the server leaves it out of each round (ignore_result_error) or aborts.
        logging.getLogger("fedbpt").error("%s cannot take part: %s", site, e)
        sys.exit(1)
    writer = SummaryWriter()
    prompt_info = client.prompt_info()  # sent once: the server needs it to write the prompt files

    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        round_ = received.current_round or 0
        result, metrics = client.run_round(decode_down(received.params, received.meta), round_)
        for key in TRACKED:
            if key in metrics:
                writer.add_scalar(key, metrics[key], global_step=round_)
        params, meta = encode_up(result)
        flare.send(flare.FLModel(params=params, metrics=metrics, meta={**meta, **prompt_info}))
        prompt_info = {}


if __name__ == "__main__":
    main()
