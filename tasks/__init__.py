"""The pipeline's work: one subpackage per concern (data, model, train, evaluate, registry,
monitor, pipeline), the DVC stage entry points in `tasks.stages`, and the shared modules
(settings, environment, errors, files, runner) every stage imports.

(Not empty on purpose: DVC warns "'tasks/__init__.py' is empty" for every stage that lists
an empty file among its deps.)
"""
