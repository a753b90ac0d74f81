# One image for every process of the system (API, workers, beat, Flower, migrations).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY setup.cfg pyproject.toml README.md alembic.ini ./
COPY config ./config
COPY orders ./orders
COPY sagas ./sagas
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-cache-dir . && useradd --system --uid 10001 app
USER app
EXPOSE 8000 5555
CMD ["gunicorn", "-c", "python:config.gunicorn", "workers.web:create_app()"]
