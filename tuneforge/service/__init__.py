"""The jobs service: OpenAI-shaped Files and Fine-tuning Jobs API over tuneforge's one train path.

``tuneforge server`` serves :func:`tuneforge.service.app.create_app`: FastAPI routes (``files``, ``jobs``,
``graders``, ``models``) over a SQLAlchemy database (``db``, migrated by Alembic at start-up), and a
:class:`~tuneforge.service.scheduler.Scheduler` thread that validates, queues, starts, follows, shrinks and
regrows jobs. Every job is its own ``tuneforge train`` process started by an executor (``executors/``);
nothing trains inside the API process.
"""
