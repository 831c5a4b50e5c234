terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40, < 7"
    }
  }
}

# Credentials come from the standard AWS chain (environment, shared config, SSO, instance role);
# none are set here.
provider "aws" {
  region = var.region

  default_tags {
    tags = {
      "cloudroutes-cluster" = var.cluster_name
    }
  }
}
