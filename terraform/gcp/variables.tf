variable "project" {
  description = "Id of the Google Cloud project to build the test cluster in."
  type        = string
}

variable "region" {
  description = "Region of the nodes' subnetwork."
  type        = string
  default     = "europe-west1"
}

variable "zone" {
  description = "Zone of the nodes, in region, or null for <region>-b."
  type        = string
  default     = null
}

variable "cluster_name" {
  description = "Name of the test cluster; prefixes every resource and is the gce ClusterName."
  type        = string
  default     = "cloudroutes-test"

  # Service account ids are 6-30 characters and "-node" / "-ctrl" are added to this name.
  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{0,23}[a-z0-9])?$", var.cluster_name))
    error_message = "The cluster_name must be 1-25 characters of a-z, 0-9 and '-', starting with a letter and not ending with '-'."
  }
}

variable "node_count" {
  description = "Number of nodes. The first one also runs the cluster's single-member etcd."
  type        = number
  default     = 3

  validation {
    condition     = var.node_count >= 1 && var.node_count <= 40 && floor(var.node_count) == var.node_count
    error_message = "The node_count must be a whole number from 1 to 40 (each node's route counts against the project's routes quota)."
  }
}

variable "machine_type" {
  description = "Compute Engine machine type of the nodes."
  type        = string
  default     = "e2-small"
}

variable "image" {
  description = "Boot image of the nodes (the startup script needs Debian 12 or a derivative)."
  type        = string
  default     = "debian-cloud/debian-12"
}

variable "ssh_source_ranges" {
  description = "IPv4 ranges allowed to reach the nodes on port 22 (empty: no SSH rule)."
  type        = list(string)
  default     = []
}

variable "subnet_cidr" {
  description = "IPv4 range of the nodes' subnetwork."
  type        = string
  default     = "10.0.1.0/24"
}

variable "first_node_host" {
  description = "Host number (in subnet_cidr) of the first node's internal IP; node i gets first_node_host + i. Google reserves hosts 0 and 1."
  type        = number
  default     = 10

  validation {
    condition     = var.first_node_host >= 2
    error_message = "The first_node_host must be 2 or more: Google reserves the first two addresses of a subnetwork."
  }
}

variable "pod_network" {
  description = "The Network of the cloudroutes config: the pod range the node subnets are leased from."
  type        = string
  default     = "10.244.0.0/16"
}

variable "mode" {
  description = "gce Mode: node (each node programs its own route) or cluster (one elected leader programs all)."
  type        = string
  default     = "node"

  validation {
    condition     = contains(["node", "cluster"], var.mode)
    error_message = "The mode must be node or cluster."
  }
}

variable "controller_role" {
  description = "Also create a service account with the cluster-mode controller role."
  type        = bool
  default     = false
}

variable "cloudroutes_package" {
  description = "What each node installs with pip: a requirement such as cloudroutes[gce]==0.1.0, or a wheel URL with [gce]."
  type        = string
  default     = "cloudroutes[gce]"
}

variable "healthz_port" {
  description = "Port of the agents' /healthz, /readyz, /metrics and /status, reachable from inside the network."
  type        = number
  default     = 8471
}
