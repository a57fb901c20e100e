"""The applications: the ``rlhf-lit`` CLI, pipelines, studies, evaluation, chat, model conversion, recipes."""
