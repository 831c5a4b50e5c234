terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 5.0, < 8"
    }
  }
}

# Credentials come from Application Default Credentials (`gcloud auth application-default
# login`, GOOGLE_APPLICATION_CREDENTIALS, or an instance's service account); none are set here.
provider "google" {
  project = var.project
  region  = var.region
  zone    = local.zone

  default_labels = {
    "cloudroutes-cluster" = var.cluster_name
  }
}
