#!/bin/bash
# Runs inside the LocalStack container once it is ready. It creates nothing (every test builds
# its own VPC); it only checks that EC2 answers, and marks the container healthy when it does.
set -euo pipefail

# LocalStack's dummy account; init hooks must name credentials, and these are not secrets.
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"

if awslocal ec2 describe-availability-zones --output text >/dev/null; then
  touch /tmp/cloudroutes-ec2-ready
  echo "cloudroutes: LocalStack EC2 is ready on port 4566"
else
  echo "cloudroutes: LocalStack EC2 does not answer; is SERVICES=ec2 set?" >&2
  exit 1
fi
