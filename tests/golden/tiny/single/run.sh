#!/bin/sh
# Rendered by builder 0.1.0: the whole pipeline (merge, create,
# serve) in one container, for hosts that run one image and nothing else.
# `builder up --target single` runs exactly this.
set -e
docker rm -f tiny 2>/dev/null || true
docker run -d \
  --name tiny \
  --restart unless-stopped \
  --label io.builder.config.sha256=78c76a6a283cd2abd21db0559e99d845bf51e7a43fad9d8f09753b939d6be090 \
  --label io.builder.project=tiny \
  --label io.builder.role=all \
  --cap-drop ALL \
  --security-opt no-new-privileges:true \
  --read-only \
  --tmpfs /tmp:size=256m,mode=1777 \
  --pids-limit 512 \
  --publish 127.0.0.1:11434:11434 \
  --mount type=bind,source=/srv/builder/models,target=/models \
  --health-cmd 'python3 -m supervisor health' \
  --health-interval 10s \
  --health-timeout 5s \
  --health-retries 3 \
  --health-start-period 30s \
  --env 'BUILDER_SERVE={"keep_alive":"-1","load_timeout":{"read_mb_s":200,"seconds":null},"parallel":{"single_above_gib":16,"value":null}}' builder-tiny:latest all
