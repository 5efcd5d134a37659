"""Pipelines: submit-time planning (`planner`), `${...}` templates (`templates`), the
runner that releases stages (`runner`), and their HTTP routes (`routes`)."""
