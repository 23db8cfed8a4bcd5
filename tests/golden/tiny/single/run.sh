#!/bin/sh
# Rendered by builder 0.1.0: the whole pipeline (merge, create,
# serve) in one container, for hosts that run one image and nothing else.
# `builder up --target single` runs exactly this.
set -e
docker rm -f tiny 2>/dev/null || true
docker run -d \
  --name tiny \
  --restart unless-stopped \
  --label io.builder.config.sha256=a687be17027460217574a316bf603c4f00b97d8615a9a122ea7c8191f015fac8 \
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
  --env 'BUILDER_SERVE={"keep_alive":"-1","load_timeout":{"read_mb_s":200,"seconds":null},"parallel":{"single_above_gib":16,"value":null},"read_ahead":true}' builder-tiny:demo all
