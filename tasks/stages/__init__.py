"""The DVC stages of `dvc.yaml`, one thin entry point each: parse arguments, call the library.

    resolve  → tasks.config        the run's settings (params.yaml + --set overrides)
    prepare  → tasks.data          canonical, deduplicated, length-limited, split
    finetune → tasks.train         the adapter or weights, tokenizer, history
    evaluate → tasks.evaluate      candidate and prompting baselines on the test split

Each runs through `tasks.runner.run_stage`: expected failures print one line on stderr and
exit with their code; `dvc repro` names the stage that failed.
"""
