"""Sets up a moto S3 server that checks credentials and IAM policies: a bucket,
and a user whose only rights are the policy given (a JSON file). Prints the
user's access key id and secret. moto must have been started with
INITIAL_NO_AUTH_ACTION_COUNT=4: these four requests are the unauthenticated ones.

    python moto_iam.py ENDPOINT BUCKET POLICY.json
"""
import json
import sys

import boto3

endpoint, bucket, policy_file = sys.argv[1:4]
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
boto3.client("s3", **kw).create_bucket(Bucket=bucket)
iam = boto3.client("iam", **kw)
iam.create_user(UserName="walvault-agent")
with open(policy_file) as f:
    policy = json.load(f)
iam.put_user_policy(UserName="walvault-agent", PolicyName="walvault", PolicyDocument=json.dumps(policy))
key = iam.create_access_key(UserName="walvault-agent")["AccessKey"]
print(key["AccessKeyId"], key["SecretAccessKey"])
