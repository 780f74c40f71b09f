"""Attack audits of an erased model: does the concept come back?

    python -m eval.attack --attack relearn --model M --concept three --output_dir DIR [flags]
    accelerate launch -m eval.attack --attack relearn ...      # several processes share the attack's cells
    python -m eval.attack --replay DIR --model M --output_dir OUT   # what an attack learned, applied to another model

``python -m eval.attack --attack NAME --help`` lists that attack's flags; a flag another attack owns is an error.
Bad input is one line and a non-zero exit; rerunning the same command resumes a killed audit.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from erase.utils.errors import cli_errors, UserError
from erase.utils.launch import setup_logging

logger = logging.getLogger("eval.attack")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, no usage block
        raise UserError(message)


def _config(parser: _Parser, cls, argv: list[str]):
    from eval.attack.utils.config import add_config_args

    add_config_args(parser, cls)
    args = parser.parse_args(argv)
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@cli_errors
def parse_args(input_args=None):
    """(attack, its validated config) from the command line; (None, a ReplayConfig) for ``--replay``."""
    from eval.attack import available_attacks, get_attack, judged_concepts

    argv = list(sys.argv[1:] if input_args is None else input_args)
    pre = _Parser(add_help=False)
    pre.add_argument("--attack", default=None)
    pre.add_argument("--replay", default=None)
    known, _ = pre.parse_known_args(argv)
    names = available_attacks()
    if known.replay is not None:
        if known.attack is not None:
            raise UserError("give --attack NAME (run an attack) or --replay DIR (apply what one learned), not both")
        from eval.attack.replay import ReplayConfig

        parser = _Parser(prog="python -m eval.attack --replay", description=__doc__.split("\n\n")[0])
        return None, _config(parser, ReplayConfig, argv)
    parser = _Parser(prog="python -m eval.attack", description=__doc__.split("\n\n")[0],
                     epilog=f"attacks: {', '.join(names)}; judged concepts: {', '.join(judged_concepts())}; "
                            "--replay DIR --model M --output_dir OUT applies what an attack learned to another model")
    parser.add_argument("--attack", required=True, choices=names, help="the attack to run")
    attack = get_attack(known.attack) if known.attack is not None else None
    if attack is None:
        parser.parse_args(argv)  # --help, or the missing --attack in one line
    config = _config(parser, attack.config_cls, argv)
    spec = getattr(config, "protocol_spec", None)
    if spec is not None:  # a flag given explicitly that the protocol overrode (e.g. equal to the field's default)
        from eval.protocols import check_flag

        args = vars(parser.parse_args(argv))
        given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
        for name in sorted(given & ({"steps", "guidance", "scheduler", "num_images"} | set(spec.attack))):
            resolved = getattr(config, name)
            if str(args[name]) != str(resolved):
                check_flag(spec, f"--{name}", args[name], resolved)
    return attack, config


@cli_errors
def main(input_args=None) -> int:
    setup_logging()
    attack, config = parse_args(input_args)
    if attack is None:
        from eval.attack.replay import replay

        replay(config)
        print(os.path.join(config.output_dir, "summary.json"))
        return 0
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from erase.utils.launch import make_accelerator

        accelerator = make_accelerator()
        setup_logging(accelerator.is_main_process)
    attack.run(config, accelerator=accelerator)
    if accelerator is None or accelerator.is_main_process:
        print(os.path.join(config.output_dir, "summary.json"))
    if accelerator is not None:
        accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
