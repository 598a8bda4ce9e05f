"""One rank of the ``mstc train --fsdp`` tests (tests/train/test_sharded.py, torchrun, gloo on CPU).

``python _trainer_fsdp_worker.py MODEL_FILE OUT MODE``; MODE is ``ddp`` or ``fsdp`` (a whole run of
STEPS steps), ``stop`` (the --fsdp run interrupted after step STOP, its checkpoint saved) or ``resume``
(the interrupted run continued to the end from its run folder, with the saved config). The run folder
(summary.json, checkpoints) is the verdict.
"""
import sys

from _torchrun import end_rank

from mst_compile.modelfile import load_model_file
from mst_compile.train.loop import TrainingInterrupted, train
from mst_compile.train.options import configs_for_model_file

STEPS, STOP = 16, 9  # updates every 2 steps; the stop lands between two updates, in the ultra phase


def main(model_file: str, out: str, mode: str) -> None:
    mf = load_model_file(model_file)
    if mode == "resume":
        train(mf, resume=out, progress=False)
    else:
        tc, mst = configs_for_model_file(mf, None, {"steps": STEPS, "fsdp": mode != "ddp"}, {"update_interval": 2})
        try:
            train(mf, tc, mst, out=out, progress=False, stop_at=STOP if mode == "stop" else None)
        except TrainingInterrupted:
            pass
    end_rank()


if __name__ == "__main__":
    main(*sys.argv[1:])
