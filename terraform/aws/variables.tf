variable "region" {
  description = "AWS region to build the test cluster in."
  type        = string
  default     = "eu-west-1"
}

variable "cluster_name" {
  description = "Name of the test cluster; prefixes every resource and is the aws-vpc ClusterName."
  type        = string
  default     = "cloudroutes-test"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,30}$", var.cluster_name))
    error_message = "The cluster_name must be 1-31 characters of a-z, 0-9 and '-', starting with a letter."
  }
}

variable "node_count" {
  description = "Number of nodes. The first one also runs the cluster's single-member etcd."
  type        = number
  default     = 3

  validation {
    condition     = var.node_count >= 1 && var.node_count <= 40 && floor(var.node_count) == var.node_count
    error_message = "The node_count must be a whole number from 1 to 40 (AWS route tables hold 50 routes by default)."
  }
}

variable "instance_type" {
  description = "EC2 instance type of the nodes."
  type        = string
  default     = "t3.small"
}

variable "key_name" {
  description = "Name of an existing EC2 key pair for SSH, or null for none."
  type        = string
  default     = null
}

variable "ssh_cidr_blocks" {
  description = "IPv4 ranges allowed to reach the nodes on port 22 (empty: no SSH rule)."
  type        = list(string)
  default     = []
}

variable "vpc_cidr" {
  description = "IPv4 range of the VPC."
  type        = string
  default     = "10.0.0.0/16"
}

variable "subnet_cidr" {
  description = "IPv4 range of the nodes' subnet, inside vpc_cidr."
  type        = string
  default     = "10.0.1.0/24"
}

variable "availability_zone" {
  description = "Availability zone of the subnet, or null to let AWS choose."
  type        = string
  default     = null
}

variable "first_node_host" {
  description = "Host number (in subnet_cidr) of the first node's private IP; node i gets first_node_host + i. AWS reserves hosts 0-3."
  type        = number
  default     = 10

  validation {
    condition     = var.first_node_host >= 4
    error_message = "The first_node_host must be 4 or more: AWS reserves the first four addresses of a subnet."
  }
}

variable "pod_network" {
  description = "The Network of the cloudroutes config: the pod range the node subnets are leased from."
  type        = string
  default     = "10.244.0.0/16"
}

variable "mode" {
  description = "aws-vpc Mode: node (each node programs its own route) or cluster (one elected leader programs all)."
  type        = string
  default     = "node"

  validation {
    condition     = contains(["node", "cluster"], var.mode)
    error_message = "The mode must be node or cluster."
  }
}

variable "controller_role" {
  description = "Also create a role and instance profile with the cluster-mode controller policy."
  type        = bool
  default     = false
}

variable "cloudroutes_package" {
  description = "What each node installs with pip: a requirement such as cloudroutes[aws]==0.1.0, or a wheel URL with [aws]."
  type        = string
  default     = "cloudroutes[aws]"
}

variable "healthz_port" {
  description = "Port of the agents' /healthz, /readyz, /metrics and /status, reachable from inside the VPC."
  type        = number
  default     = 8471
}
