"""MetaGPT-like software company on HumanEval (issue 4). Importing registers the "metagpt" scenario."""
