terraform {
  required_version = ">= 1.5"

  required_providers {
    alicloud = {
      source  = "aliyun/alicloud"
      version = ">= 1.252.0, < 2"
    }
  }
}

# Credentials come from the provider's usual chain (ALIBABA_CLOUD_ACCESS_KEY_ID and
# ALIBABA_CLOUD_ACCESS_KEY_SECRET, a profile of ~/.aliyun/config.json, or an ECS RAM role);
# none are set here.
provider "alicloud" {
  region = var.region
}
